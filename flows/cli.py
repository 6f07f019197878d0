"""`imgclf`: the command line. Parsing and printing only; every command calls a function the tests call."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys
import traceback
from pathlib import Path

# TensorFlow's C++ start-up chatter (CUDA probing, CPU features) is noise in a terminal.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from flows.console import native_noise_filtered, quiet_prefect_console
from flows.dvc_project import DvcProject, one_run_at_a_time
from tasks.errors import StageError
from tasks.files import read_json, remove_stale_temporaries
from tasks.params import ParamsError, load_params, parse_override
from tasks.redact import RedactingFilter, hide_secrets, redact
from tasks.report import gate_line, score_line
from tasks.stages import STAGES, Layout, run_stage

# Errors whose message already says what is wrong: printed as one line, no traceback.
EXPECTED_ERRORS = (StageError, FileNotFoundError)


def _file_to_write(text: str, example: str) -> Path:
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: name the file to write in it, e.g. {path / example}")
    return path


def _zip_to_write(text: str) -> Path:
    path = _file_to_write(text, "demo.zip")
    if path.suffix.lower() != ".zip":
        raise argparse.ArgumentTypeError(f"{text}: the demo archive is a zip: name it *.zip")
    return path


def _per_class(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 4:
        raise argparse.ArgumentTypeError(f"{text}: a whole number, 4 or more (the split needs train, val and test "
                                         "images of each class)")  # fmt: skip
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgclf",
        description="Folder-per-class image archive -> clean, cached, split dataset -> trained, evaluated, "
        f"exported, gated and reported image classifier ({', '.join(STAGES)}), by stage or as one Prefect flow.",
    )
    parser.add_argument("--version", action="version", version=f"imgclf {importlib.metadata.version('imgclf')}")
    parser.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    parser.add_argument("--verbose", action="store_true",
                        help="show Python tracebacks of failures (always kept in the Prefect run's logs)")  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)

    stage = commands.add_parser("stage", help="run one stage (what dvc.yaml calls)")
    stage.add_argument("name", choices=list(STAGES), help="stage to run")

    run = commands.add_parser(
        "run", help="run the whole pipeline as a Prefect flow (no server needed); unchanged stages are skipped"
    )
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a param by dotted key, e.g. --set prepare.image_size=32; repeatable")  # fmt: skip
    run.add_argument("stages", nargs="*", type=_stage_name, metavar="STAGE",
                     help="run only these stages and those they depend on, as `dvc repro STAGE` (default: all)")  # fmt: skip

    serve = commands.add_parser("serve", help="serve the flow from this machine on orchestration.schedule (flow.serve)")
    serve.add_argument("--name", default="weekly-retrain", help="deployment name (default: weekly-retrain)")

    remote = commands.add_parser("remote", help="make s3://bucket/prefix the DVC remote (endpoint from s3.endpoint_url)")
    remote.add_argument("uri", help="s3://bucket/prefix")

    predict = commands.add_parser("predict", help="predict labels of image files or folders with a saved model, "
                                                      "calibrated and thresholded as evaluate chose (calibration.json)")
    predict.add_argument("--model", type=Path, default=Path("models/model.keras"), help="default: models/model.keras")
    predict.add_argument("--out", type=lambda text: _file_to_write(text, "predictions.csv"),
                         help="CSV file to write (default: stdout)")  # fmt: skip
    predict.add_argument("--explain", type=Path, metavar="DIR",
                         help="also write a Grad-CAM overlay PNG per image into DIR: where the model looked")  # fmt: skip
    predict.add_argument("paths", type=Path, nargs="+", metavar="PATH",
                         help="image files or folders; a file over validate.max_pixels (from --params, when that file "
                              "exists) is a row with its error")  # fmt: skip

    init = commands.add_parser("init", help="make DIR a ready git + DVC project: params.yaml, dvc.yaml, prefect.yaml")
    init.add_argument("folder", type=Path, metavar="DIR", help="the project folder (created if missing)")
    init.add_argument("--url", help="the archive: sets data.url in params.yaml and empties data.sha256")

    demo = commands.add_parser("demo-data", help="write the offline, malaria-like demo archive")
    demo.add_argument("out", type=_zip_to_write, help="the zip to write, e.g. data/demo/cell_images_demo.zip")
    demo.add_argument("--per-class", type=_per_class, default=200, help="valid images per class, 4 or more (default 200)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def _stage_name(name: str) -> str:
    if name not in STAGES:
        raise argparse.ArgumentTypeError(f"no stage {name!r} (choose from {', '.join(STAGES)})")
    return name


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    imgclf_log = logging.getLogger("imgclf")
    imgclf_log.addFilter(RedactingFilter())
    if args.command not in ("run", "serve"):  # in a flow run, Prefect's handlers show the stage logs
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        imgclf_log.addHandler(handler)
    imgclf_log.setLevel(logging.INFO)
    try:
        with native_noise_filtered():
            _command(args)
    except EXPECTED_ERRORS as exc:
        _fail(str(exc), args.verbose)
        return 2 if isinstance(exc, ParamsError) else 1
    except KeyboardInterrupt:
        _fail("interrupted", args.verbose)
        return 130
    except BrokenPipeError:
        # The reader left early (`imgclf predict ... | head`): stop quietly, as cat does. Stdout goes to
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # a bug or an environment problem: still one line, the traceback on request
        _fail(str(exc), args.verbose, kind=type(exc).__name__)
        return 1
    return 0


def _fail(message: str, verbose: bool, kind: str = "") -> None:
    """Prints the message's first line that says something; an unexpected error's `kind` (its type) before it,
    and where its traceback is."""
    if verbose:
        traceback.print_exc()
    first = next((line.strip() for line in message.splitlines() if line.strip()), "failed")
    if kind:
        first = f"{kind}: {first}" + ("" if verbose else " (--verbose shows the traceback)")
    print(f"imgclf: error: {redact(first)}", file=sys.stderr)


def _command(args: argparse.Namespace) -> None:
    if args.command == "stage":
        params, layout = load_params(args.params), Layout(Path("."))
        with one_run_at_a_time(layout.root, f"imgclf stage {args.name}", shared=True):  # not beside an `imgclf run`
            remove_stale_temporaries(layout.output_folders())
            try:
                output = run_stage(args.name, params, layout)
            except FileNotFoundError as missing:
                if not missing.filename or Path(missing.filename).is_absolute():
                    raise
                # A project path: what a stage before this one writes.
                raise StageError(f"{missing.filename}: missing: run the stages before {args.name} first "
                                 f"(`imgclf run {args.name}` or `dvc repro {args.name}`)") from None
        print(output)
    elif args.command == "run":
        overrides = dict(parse_override(item) for item in args.overrides)
        if not Path(args.params).is_file():
            DvcProject(Path("."))  # no params file: in a folder that is no project, say how to make one
        load_params(args.params, overrides)  # bad params stop here, before Prefect starts
        DvcProject(Path("."))  # and so does a folder that is not a project
        # And a run going on here: one line now, no failed flow run. Held from here, no later: two runs
        # started a second apart must not both pass. (A deployment's flow run, without this, takes it itself.)
        with one_run_at_a_time(Path("."), "imgclf run", for_the_flow=True):
            from flows.server import prefect_api, start_server

            server = start_server()
            # Loaded while the server boots on the other core: DVC's API, which the flow asks first, and
            # the flow's modules (seconds each). DVC's lock is taken now, not when the flow starts: a
            # `dvc repro` started while the server boots would run stages beside this run.
            with DvcProject(Path(".")).held():
                from flows.pipeline import pipeline

                quiet_prefect_console(args.verbose)
                with prefect_api(server):
                    outcome = pipeline(overrides=hide_secrets(overrides), params_path=args.params, stages=args.stages)
        width = max(map(len, outcome))
        for name, what in outcome.items():
            print(f"{name:<{width}} {what}")
        if "evaluate" in outcome:  # the last line: how the model scored, and where it went
            summary = score_line(read_json(Layout(Path(".")).metrics_dir / "eval.json"))
            decision = gate_line(Layout(Path("."))) if outcome.get("publish") == "ran" else ""
            print(f"{summary}; {decision}" if decision else summary)
    elif args.command == "serve":
        load_params(args.params)
        from flows.pipeline import serve

        quiet_prefect_console(args.verbose)
        serve(args.params, args.name)
    elif args.command == "remote":
        from flows.versioning import configure_remote

        for line in configure_remote(Layout(Path(".")), args.uri, load_params(args.params).s3):
            print(line)
    elif args.command == "predict":
        from tasks.params import ValidateParams
        from tasks.predict import check_outputs, expand, predict, write_rows

        # What validate accepts: the project's validate.max_pixels (outside a project, its default).
        validate = ValidateParams()
        if Path(args.params).exists():
            try:
                validate = load_params(args.params).validate
            except ParamsError as exc:  # another tool's params.yaml, say: predict needs one key of it, not the file
                print(f"imgclf: warning: {exc}; predict judges files by validate.max_pixels' default "
                      f"({validate.max_pixels:,})", file=sys.stderr)  # fmt: skip
        files = expand(args.paths, args.out, args.explain)
        check_outputs(args.model, files, args.out, args.explain)
        write_rows(predict(args.model, files, validate.max_pixels), args.out)
        if args.explain:
            from tasks.gradcam import explain_files

            written = explain_files(args.model, files, args.explain, validate.max_pixels)
            print(f"imgclf: {len(written)} Grad-CAM overlays in {args.explain}", file=sys.stderr)
    elif args.command == "init":
        from flows.init import init_project

        for line in init_project(args.folder, args.url):
            print(line)
    elif args.command == "demo-data":
        from tasks.demo_data import make_demo_archive

        print(make_demo_archive(args.out, per_class=args.per_class, seed=args.seed))


if __name__ == "__main__":
    sys.exit(main())
