"""What a person sees in the terminal: one line per failure, no secrets, no native libraries' chatter.

The Prefect run's own logs (UI, API) keep everything: full tracebacks included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator

from tasks.redact import RedactingFilter

# Start-up chatter of TensorFlow's C++ side, written straight to file descriptor 2: CPU
# features, oneDNN, the CUDA probing of a machine without a GPU, a SavedModel's graph naming an
# attribute this TensorFlow's op lacks (harmless: it is dropped), and TFLite's interpreter (the
# export's parity check) announcing its CPU delegate. Its real errors still show.
NATIVE_NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IW]\d{4} [^\]]*(port|cpu_feature_guard|cudart_stub|cuda_executor|cuda_diagnostics)\.cc:\d+\]"
    rb"|E\d{4} [^\]]*(cuda_platform|cuda_executor|cuda_dnn|cuda_fft|cuda_blas)\.cc:\d+\]"
    rb"|E\d{4} [^\]]*node_def_util\.cc:\d+\] NodeDef mentions attribute use_unbounded_threadpool "
    rb"|To enable the following instructions: .* in other operations, rebuild TensorFlow"
    rb"|INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.)"
)


class _ShortTracebacks(logging.Filter):
    """On the terminal, a failure is its message's first line: the traceback stays in the run's logs."""

    def __init__(self, handler: logging.Handler):
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info and "Traceback (most recent call last)" not in record.getMessage():
            return True
        short = logging.makeLogRecord(record.__dict__ | {"exc_info": None, "exc_text": None, "args": (),
                                                           "msg": record.getMessage().split("\n", 1)[0]})  # fmt: skip
        self.handler.handle(short)
        return False


# Prefect's lines that say nothing a person acts on: the summary printed at the end says it.
# A failure's own line ("failed with exception: ...") says what the Failed state repeats, and
# the stages after it never started (NotReady).
PREFECT_CHATTER = re.compile(
    r"^(Finished in state (Completed|Skipped|Failed|NotReady)\(.*\)$|(Starting|Stopping) temporary server on )", re.DOTALL
)


class _NoChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not PREFECT_CHATTER.match(record.getMessage())


def quiet_prefect_console(verbose: bool) -> None:
    """Redacts URLs in every Prefect log handler; unless `verbose`, keeps tracebacks and chatter off the terminal."""
    loggers = [logging.getLogger(name) for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        for handler in logger.handlers:
            handler.addFilter(RedactingFilter())
            if not verbose and type(handler).__name__ == "PrefectConsoleHandler":
                handler.addFilter(_NoChatter())
                handler.addFilter(_ShortTracebacks(handler))



_END_OF_FILTER = b"\0imgclf: end of the stderr filter\n"


@contextlib.contextmanager
def native_noise_filtered() -> Iterator[None]:
    """Within the block, lines on file descriptor 2 that match NATIVE_NOISE are dropped; the rest pass."""
    sys.stderr.flush()
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as lines:
            for line in lines:
                line, end = line.removesuffix(_END_OF_FILTER), line.endswith(_END_OF_FILTER)
                if not NATIVE_NOISE.match(line):
                    os.write(terminal, line)
                if end:
                    return

    pumping = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    pumping.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        # Not EOF: children started in the block (multiprocessing's resource tracker lives as long
        # as this process) hold the pipe's write end; the pump would wait for them.
        os.write(2, _END_OF_FILTER)
        os.dup2(terminal, 2)
        pumping.join(timeout=5)
        os.close(terminal)
