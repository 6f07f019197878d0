"""Typed configuration: `params.yaml` parsed once into frozen objects.

Every knob lives in `params.yaml`, grouped by stage; each stage receives only its own
section. Unknown keys and bad values fail at load time with the dotted key's name, before
any work starts.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from urllib.parse import urlparse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from croniter import croniter
from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, ReusedAnchorWarning
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from tasks.errors import StageError
from tasks.redact import HOLDS_CREDENTIALS, has_secret

MALARIA_URL = "https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip"
URL_SCHEMES = ("http", "https", "s3", "file", "")  # "": a local path


def url_scheme(url: str) -> str:
    """Returns the URL's scheme in lower case; "" for a local path (a Windows drive letter too)."""
    scheme = urlparse(url).scheme.lower()
    return "" if len(scheme) == 1 else scheme


class ParamsError(StageError, ValueError):
    """A bad params file or override; the message is one line naming the dotted key."""


# An optional text setting: left empty in params.yaml (or given as "") it is unset.
OptionalText = Annotated[str | None, BeforeValidator(lambda value: value or None)]


def _home(value: Any) -> Any:
    # A local path as a shell takes it: YAML and `--set KEY=~/...` leave the ~ as it is.
    return os.path.expanduser(value.strip()) if isinstance(value, str) and value.strip().startswith("~") else value


# A local path: `~` is the user's home.
LocalPath = Annotated[str, BeforeValidator(_home)]
OptionalPath = Annotated[str | None, BeforeValidator(lambda value: _home(value) or None)]
# A class: a folder name, which YAML reads as a number when it is digits (`positive_class: 1`, classes 0 and 1).
OptionalClass = Annotated[str | None, BeforeValidator(
    lambda value: str(value) if isinstance(value, int) and not isinstance(value, bool) else value or None)]


# Seeds feed NumPy and TensorFlow generators, which take unsigned 32-bit seeds.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


def _holds_bool(value: Any) -> bool:
    return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(map(_holds_bool, value)))


def _numeric(annotation: Any) -> bool:
    if annotation in (int, float):
        return True
    if get_origin(annotation) is Literal:
        return any(type(value) is int for value in get_args(annotation))
    return any(_numeric(arg) for arg in get_args(annotation))


class _Section(BaseModel):
    # inf and nan never make sense here: they pass range checks and crash (or train to NaN) later.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # YAML reads true as a boolean, which Python counts as 1: `channels: true` cached gray images.
        if _holds_bool(value) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError("a number, not true or false")
        return value


# What botocore accepts as a bucket name before sending anything (AWS's own rules are stricter).
S3_BUCKET = re.compile(r"[a-zA-Z0-9.\-_]{1,255}")


def _check_bucket(uri: str) -> None:
    """Raises ValueError when an s3:// URI's bucket is a name botocore would refuse, or credentials in it."""
    bucket = uri.removeprefix("s3://").partition("/")[0]
    # ':' too: a secret holding '/' (as AWS secret keys may) puts the '@' past where the bucket seems to end.
    if "@" in bucket or ":" in bucket:  # and say so without echoing it: it may hold a password
        raise ValueError("an s3:// URL holds no credentials (user@ or user:password@): they come from "
                         "boto3's chain (AWS_* variables, a profile, a role)")  # fmt: skip
    if not S3_BUCKET.fullmatch(bucket):
        raise ValueError(f"invalid bucket name {bucket!r} (letters, digits, '.', '-', '_')")


class DataParams(_Section):
    url: LocalPath = MALARIA_URL
    sha256: str | None = None
    max_extract_bytes: int = Field(default=2_000_000_000, gt=0)
    retries: int = Field(default=5, ge=0)
    retry_backoff: float = Field(default=1.0, ge=0)
    timeout: float = Field(default=60.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url_we_can_fetch(cls, url: str) -> str:
        url = url.strip()
        if not url:
            raise ValueError("must not be empty")
        scheme = url_scheme(url)
        if scheme not in URL_SCHEMES:
            supported = ", ".join(f"{s}://" for s in URL_SCHEMES if s)
            raise ValueError(f"unsupported scheme {scheme}:// (supported: {supported}, or a local path)")
        if scheme == "s3":
            _check_bucket(url)
            if not urlparse(url).path.strip("/"):
                raise ValueError("an s3:// URL names an object: s3://bucket/key")
        elif scheme in ("http", "https"):
            parts = urlparse(url)
            # The request cannot carry it, and the redaction of logs reads a URL to its first space.
            if re.search(r"\s", parts.path + parts.params + parts.query + parts.fragment):
                raise ValueError("a space in the URL's path or query: write it as %20")
            try:
                urlparse(url).port  # noqa: B018 (raises on a port beyond 65535 or not a number)
            except ValueError:
                raise ValueError("the URL's port is not a number from 1 to 65535") from None
            if not parts.hostname:  # https:///host/x: a third slash, found only after the retries
                raise ValueError(f"no host in the URL (after {scheme}://)")
        return url

    @field_validator("sha256", mode="before")
    @classmethod
    def _sha256_hex(cls, value: Any) -> str | None:
        if value is None or value == "":
            return None
        text = str(value).strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", text):
            raise ValueError("must be 64 hex digits (or empty for no check)")
        return text


class ValidateParams(_Section):
    max_pixels: int = Field(default=50_000_000, gt=0)
    # Near-duplicates (their own stage, after cache): images whose 8x8 gray thumbnails differ by at
    # most this many gray levels (RMS, of 255) are one cluster, kept in one split; 0: off.
    near_duplicate_distance: float = Field(default=4.0, ge=0, le=255)


class PrepareParams(_Section):
    image_size: tuple[int, int] = (64, 64)
    resize: Literal["stretch", "pad", "crop"] = "stretch"
    channels: Literal[1, 3] = 3

    @field_validator("image_size", mode="before")
    @classmethod
    def _square_or_pair(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value, value)
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError("must be an int or [height, width]")
        if any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in value):
            raise ValueError("sizes must be positive integers")
        return tuple(value)


class SplitParams(_Section):
    test: float = Field(default=0.15, gt=0, lt=1)  # evaluate, the gate and the report score the test split
    val: float = Field(default=0.15, ge=0, lt=1)
    seed: Seed = 42
    group_pattern: str | None = None
    # An archive laid out as {train,val,test}/<class>/: keep its own split, or ignore it and re-split.
    archive_split: Literal["keep", "ignore"] = "keep"

    @field_validator("group_pattern", mode="before")
    @classmethod
    def _regex_with_group(cls, value: Any) -> str | None:
        if value is None or value == "":
            return None
        if not isinstance(value, str):  # 123 or [a] from YAML: re.compile's TypeError would stop the split stage
            raise ValueError(f"a regex in text, not {value!r}")
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regex: {exc}") from None
        if compiled.groups < 1:
            raise ValueError("needs a capturing group, e.g. ^(C\\d+P\\d+)")
        return value

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitParams:
        if self.test + self.val >= 1:
            raise ValueError(f"test + val must be below 1 (got {self.test} + {self.val})")
        return self


class AugmentParams(_Section):
    """Random transforms of training batches, as layers at the front of the model (0 disables each)."""

    flip: Literal["horizontal", "vertical", "both", "none"] = "horizontal"
    rotation: float = Field(default=0.03, ge=0, le=1)  # fraction of a full turn, either way (0.03: 11 degrees)
    zoom: float = Field(default=0.0, ge=0, lt=1)
    translation: float = Field(default=0.05, ge=0, lt=1)  # fraction of height and width
    contrast: float = Field(default=0.0, ge=0, lt=1)
    brightness: float = Field(default=0.0, ge=0, le=1)
    # What rotation, zoom and translation put where the image has no pixels: reflect or nearest
    # repeat the image's own; constant paints black, an edge the model may learn as a feature.
    fill_mode: Literal["reflect", "nearest", "constant"] = "reflect"
    # How they resample: nearest keeps the image's own pixel values; bilinear blurs them a little.
    interpolation: Literal["nearest", "bilinear"] = "nearest"


NO_AUGMENT = AugmentParams(flip="none", rotation=0, zoom=0, translation=0, contrast=0, brightness=0)


class CnnParams(_Section):
    """The seed notebook's Conv2D/MaxPooling stack: one conv block per entry of `filters`."""

    filters: tuple[int, ...] = (32, 64, 64)
    kernel_size: int = Field(default=3, gt=0)
    pool_size: int = Field(default=2, gt=0)
    padding: Literal["valid", "same"] = "valid"
    dense_units: int = Field(default=64, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    batch_norm: bool = False
    separable: bool = False

    @field_validator("filters")
    @classmethod
    def _positive_filters(cls, filters: tuple[int, ...]) -> tuple[int, ...]:
        if not filters or any(f <= 0 for f in filters):
            raise ValueError("must be a non-empty list of positive ints")
        return filters


# The seed notebook's CNN, layer for layer: Conv2D 32, MaxPool, Conv2D 64, MaxPool, Conv2D 64
# (3x3, relu, valid), Flatten, Dense 64 relu, then the output layer.
SEED_CNN = CnnParams(filters=(32, 64, 64), kernel_size=3, pool_size=2, padding="valid", dense_units=64, dropout=0.0,
                     batch_norm=False, separable=False)  # fmt: skip


class TrainParams(_Section):
    # default: the settings below. seed: the seed notebook's recipe, for comparison: its CNN
    # (SEED_CNN, whatever train.cnn says), no augmentation, plain Adam at 1e-3 with no schedule
    # or weight decay, every epoch run and the last one's weights kept (see `recipe_settings`).
    recipe: Literal["default", "seed"] = "default"
    model: Literal["cnn", "vgg16", "mobilenet_v3_small", "efficientnet_b0"] = "cnn"
    # At most 1000 (and as many fine-tuning): a phase's epoch orders are laid out before its first epoch,
    # a second or so per hundred (early stopping usually ends it far sooner).
    epochs: int = Field(default=40, gt=0, le=1000)
    batch_size: int = Field(default=32, gt=0)  # per replica
    learning_rate: float = Field(default=1e-3, gt=0)  # the start of the schedule
    schedule: Literal["constant", "cosine"] = "cosine"  # cosine: decays to 0 over each phase's epochs
    weight_decay: float = Field(default=0.0, ge=0, lt=1)  # decoupled, as AdamW; 0: plain Adam
    seed: Seed = 42
    patience: int = Field(default=5, ge=0)  # epochs without val-loss gain before stopping; 0 never stops
    # Early stopping waits this many batches first: a small set (an epoch of a few batches, a noisy
    # val split) runs all its epochs; a large one may stop after a few. 0: patience alone decides.
    min_steps: int = Field(default=1000, ge=0)
    restore_best: bool = True  # end with the best val-loss epoch's weights; false: the last epoch's
    # Transfer models: imagenet, none, or the path of a local weights file (include_top=False).
    weights: LocalPath = "imagenet"
    fine_tune_layers: int = Field(default=0, ge=0)  # top base layers unfrozen in phase two; 0 skips it
    fine_tune_epochs: int = Field(default=5, ge=0, le=1000)
    fine_tune_lr: float = Field(default=1e-5, gt=0)
    class_weight: Literal["none", "balanced"] = "none"
    # auto: mixed_float16 on GPU, mixed_bfloat16 on a CPU with native bfloat16 (AVX512_BF16, AMX), else float32
    precision: Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"] = "auto"
    jit_compile: Literal["auto", "true", "false"] = "auto"  # auto: XLA on GPU
    # auto: MirroredStrategy when 2+ GPUs; multi_worker: MultiWorkerMirroredStrategy over TF_CONFIG's hosts
    strategy: Literal["auto", "mirrored", "multi_worker"] = "auto"
    cnn: CnnParams = CnnParams()
    # A CSV with a `path` column (e.g. the rows of data/label_issues.csv you agree with): those images
    # are dropped from the train and val splits. Its sha256 goes into models/model.json.
    exclude: OptionalPath = None

    @field_validator("jit_compile", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        return str(value).lower() if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _seed_recipe_is_a_cnn(self) -> TrainParams:
        if self.recipe == "seed" and self.model != "cnn":
            raise ValueError(f"recipe: seed is the seed notebook's CNN; it cannot train model {self.model} "
                             "(set train.model: cnn, or train.recipe: default)")  # fmt: skip
        return self


def recipe_settings(train: TrainParams, augment: AugmentParams) -> tuple[TrainParams, AugmentParams]:
    """Returns the train and augment settings a run uses: as given for recipe default; for
    recipe seed, the seed notebook's CNN and loop, every extra off (the rest as given)."""
    if train.recipe != "seed":
        return train, augment
    seed = {"learning_rate": 1e-3, "batch_size": 64, "schedule": "constant", "weight_decay": 0.0, "patience": 0,
            "min_steps": 0, "restore_best": False, "cnn": SEED_CNN}  # fmt: skip
    return train.model_copy(update=seed), NO_AUGMENT


class EvaluateParams(_Section):
    """Calibration and the operating point, both fitted on the val split and reported on test."""

    calibrate: bool = True  # temperature scaling fitted on val; false: the model's own probabilities
    # Two classes: the class to catch and the recall wanted on val; the threshold is chosen to reach
    # it. Empty: the class with the higher probability wins (threshold 0.5 for two classes).
    positive_class: OptionalClass = None
    target_recall: float | None = Field(default=None, gt=0, le=1)
    bootstrap: int = Field(default=1000, ge=100, le=10_000)  # resamples for the 95% intervals
    seed: Seed = 42

    @model_validator(mode="after")
    def _both_or_neither(self) -> EvaluateParams:
        if (self.positive_class is None) != (self.target_recall is None):
            raise ValueError("positive_class and target_recall go together: set both, or neither")
        return self


class AuditParams(_Section):
    """Grouped cross-validation of the train recipe on train+val, outside the path to publish."""

    folds: int = Field(default=0, ge=0)  # k folds by group and near-duplicate cluster; 0: off
    seed: Seed = 42

    @field_validator("folds")
    @classmethod
    def _off_or_two_or_more(cls, folds: int) -> int:
        if folds == 1:
            raise ValueError("must be 0 (off) or at least 2")
        return folds


class GateParams(_Section):
    """Champion/challenger: when this run's model may replace the published one."""

    metric: Literal["macro_f1", "sensitivity"] = "macro_f1"  # sensitivity: at the threshold, needs positive_class
    tolerance: float = Field(default=0.0, ge=0, le=1)  # promote when challenger - champion >= -tolerance on both sets
    force: bool = False  # promote whatever the scores say; recorded as forced
    bootstrap: int = Field(default=1000, ge=100, le=10_000)  # paired resamples for the differences' 95% intervals
    seed: Seed = 42


class S3Params(_Section):
    """Where S3 is: boto3's credential chain supplies who you are (never put keys here)."""

    endpoint_url: OptionalText = None  # an S3-compatible store; empty: AWS (or AWS_ENDPOINT_URL)
    region: OptionalText = None

    @field_validator("endpoint_url")
    @classmethod
    def _http_endpoint(cls, url: str | None) -> str | None:
        # Checked here: botocore says only "ValueError" once a stage first reaches for S3.
        if url is not None and (url_scheme(url) not in ("http", "https") or not urlparse(url).hostname):
            raise ValueError("must be http(s)://HOST[:PORT], e.g. http://127.0.0.1:9000")
        if url is not None and has_secret(url):  # `imgclf remote` writes it into .dvc/config, which git tracks
            raise ValueError(f"{HOLDS_CREDENTIALS}: boto3's chain gives them")
        return url


class PublishParams(_Section):
    s3_uri: str | None = None  # s3://bucket/prefix for each run's model, metrics, plots; empty: local_dir
    local_dir: LocalPath = "models/champion"  # with s3_uri empty: the champion folder the gate compares against

    @field_validator("s3_uri", mode="before")
    @classmethod
    def _s3_or_nothing(cls, value: Any) -> Any:
        if not value:
            return None
        if not str(value).startswith("s3://") or len(str(value)) <= len("s3://"):
            raise ValueError("must be s3://bucket/prefix, or empty")
        _check_bucket(str(value))
        return str(value).rstrip("/")


class OrchestrationParams(_Section):
    """How the Prefect flow runs; no stage reads these, so changing them re-runs nothing."""

    task_runner: Literal["threads", "processes", "dask"] = "processes"  # for shard fan-out
    dask_address: OptionalText = None  # an existing Dask scheduler; empty: a temporary local cluster
    dvc_commit: bool = True  # record each stage that ran in dvc.lock; false: nothing recorded, all re-run
    dvc_push: bool = True  # push data and model when a DVC remote is configured
    git_commit: bool = False  # commit dvc.lock after the run (in a git repo)
    schedule: str = "0 3 * * 1"  # cron of `imgclf serve` (weekly retrain: Mondays 03:00)

    @field_validator("dask_address")
    @classmethod
    def _scheduler_address(cls, address: str | None) -> str | None:
        # Checked here: Dask says what is wrong with it only once a stage hands out its first shards.
        shape = r"((tcp|tls|ucx|ws|wss)://)?(\[[0-9a-fA-F:.]+\]|[^\s:/\[\]]+):(\d+)"
        if address is not None and not ((found := re.fullmatch(shape, address)) and 0 < int(found[4]) <= 65535):
            raise ValueError("must be a Dask scheduler's address, [tcp://]HOST:PORT (PORT 1-65535)")
        return address

    @field_validator("schedule")
    @classmethod
    def _cron(cls, schedule: str) -> str:
        # Prefect refuses croniter's random (R) and hashed (H) fields too.
        if not croniter.is_valid(schedule) or any(field.upper() in ("R", "H") for field in schedule.split()):
            raise ValueError(f"not a cron expression: {schedule!r} (e.g. '0 3 * * 1', Mondays 03:00)")
        return schedule


# The section is named for its stage; as a field it shadows the deprecated
# BaseModel.validate classmethod, which nothing here calls.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)

    class Params(_Section):
        data: DataParams = DataParams()
        validate: ValidateParams = ValidateParams()
        prepare: PrepareParams = PrepareParams()
        split: SplitParams = SplitParams()
        augment: AugmentParams = AugmentParams()
        train: TrainParams = TrainParams()
        evaluate: EvaluateParams = EvaluateParams()
        s3: S3Params = S3Params()
        gate: GateParams = GateParams()
        publish: PublishParams = PublishParams()
        audit: AuditParams = AuditParams()
        orchestration: OrchestrationParams = OrchestrationParams()

        @model_validator(mode="after")
        def _model_fits_image_size(self) -> Params:
            if self.gate.metric == "sensitivity" and self.evaluate.positive_class is None:
                raise ValueError("gate.metric: sensitivity needs evaluate.positive_class and evaluate.target_recall")
            height, width = self.prepare.image_size
            if self.train.model != "cnn":
                if min(height, width) < 32:
                    raise ValueError(f"train.model: {self.train.model} needs prepare.image_size of at least 32")
                return self
            cnn = recipe_settings(self.train, self.augment)[0].cnn
            for side in (height, width):
                for block in range(len(cnn.filters)):
                    side = side // cnn.pool_size if block else side
                    side = side - cnn.kernel_size + 1 if cnn.padding == "valid" else side
                    if side < 1:
                        raise ValueError(
                            f"train.cnn: {len(cnn.filters)} conv blocks (kernel {cnn.kernel_size}, pool {cnn.pool_size}, "
                            f"padding {cnn.padding}) shrink prepare.image_size {height}x{width} to nothing"
                        )
            return self


def parse_override(assignment: str) -> tuple[str, Any]:
    """Returns (dotted key, value) from `key=value`; the value is read as YAML (`5`, `[64, 48]`)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.epochs=5")
    try:
        return key.strip(), (_read_yaml(raw) if raw.strip() else None)
    except YAMLError as exc:
        raise ParamsError(f"--set {key.strip()}: not a valid YAML value: {_yaml_problem(exc)}") from None


def _apply_override(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = tree
    *parents, leaf = dotted.split(".")
    walked: list[str] = []
    for part in parents:
        walked.append(part)
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ParamsError(f"{'.'.join(walked)}: is a value, cannot set {dotted}")
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        # A section given whole (`--set 'data={url: ...}'`) sets the keys it names: DVC compares every
        # param a stage lists, and one missing from the run's params would stop it.
        for key, item in value.items():
            _apply_override(node[leaf], str(key), item)
        return
    node[leaf] = value


def _one_line(source: str, error: ValidationError, culprits: Mapping[int, str], given_as: str) -> str:
    """Returns every problem on one line, each under where it came from: the override without which it goes
    away (`culprits`, by the problem's index), else the file."""
    problems = []
    for index, item in enumerate(error.errors()):
        dotted = ".".join(str(part) for part in item["loc"] if not str(part).startswith("function-"))
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        origin = f"{given_as} {culprits[index]}" if index in culprits else source
        problems.append(f"{origin}: {dotted}: {message}" if dotted else f"{origin}: {message}")
    return "; ".join(problems)


def _culprits(path: str | Path, overrides: Mapping[str, Any], error: ValidationError, text: str | None) -> dict[int, str]:
    """Returns {index of a problem in `error`: the first override without which it goes away}. A check across
    keys (positive_class with target_recall, a model with an image size) is blamed on what broke it."""
    def identity(item: dict) -> tuple:  # a check across sections (no location) is told apart by the key it names first
        return item["loc"], item["type"], "" if item["loc"] else item["msg"].removeprefix("Value error, ").partition(":")[0]

    found: dict[int, str] = {}
    for key in overrides:
        try:
            Params.model_validate(params_tree(path, {k: v for k, v in overrides.items() if k != key}, text))
            left: set = set()
        except ValidationError as without:
            left = {identity(item) for item in without.errors()}
        except ParamsError:  # the others alone do not apply (one sets a key below a value this one made a section)
            continue
        for index, item in enumerate(error.errors()):
            if identity(item) not in left:
                found.setdefault(index, key)
    return found


def _read_yaml(text: str) -> Any:
    # As DVC reads params.yaml (ruamel, YAML 1.2), so a run uses the values dvc.lock records: PyYAML's
    # YAML 1.1 reads `seed: 017` as 15 and `yes` as True where DVC reads 17 and "yes". A key written
    # twice in one mapping is refused, as DVC refuses it.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReusedAnchorWarning)  # an anchor defined again: YAML 1.2 allows it
        try:
            return YAML(typ="safe").load(text)
        except (TypeError, ValueError, AssertionError) as exc:  # ruamel's own checks, for a list as a key, say
            raise YAMLError(f"cannot be read ({type(exc).__name__}{': ' if str(exc) else ''}{exc})") from None


def _yaml_problem(exc: YAMLError) -> str:
    """Returns what is wrong, and on which line: the YAML reader's first line is often only its context."""
    if not isinstance(exc, MarkedYAMLError) or not exc.problem:
        return str(exc).splitlines()[0]
    mark = exc.problem_mark
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
    if isinstance(exc, DuplicateKeyError):  # its values are shown as {} for sections: the key and line say it
        key = re.match(r'found duplicate key "(.*)" with value', exc.problem)
        return f"key {key.group(1) if key else ''!r} given twice in one mapping, again on line {mark.line + 1}"
    return exc.problem + where


def read_params_text(path: Path) -> str:
    """Returns the params file's text; ParamsError when it cannot be read."""
    # A mistyped --params must not quietly run on the defaults (and start the 337 MB download).
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read the params file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def params_tree(path: str | Path, overrides: Mapping[str, Any] | None = None, text: str | None = None) -> dict[str, Any]:
    """Returns the params file as read from YAML, with dotted overrides applied; not yet checked.
    `text`: the file's content, read already."""
    path = Path(path)
    try:
        tree: Any = _read_yaml(read_params_text(path) if text is None else text) or {}
    except YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    if not isinstance(tree, dict):
        raise ParamsError(f"{path}: expected a mapping of sections at the top level")
    return apply_overrides(tree, overrides or {})


def apply_overrides(tree: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Returns `tree` with the dotted overrides set in it, in order (the overrides themselves stay as given)."""
    for dotted, value in overrides.items():
        _apply_override(tree, dotted, copy.deepcopy(value))  # a section given whole: keys set below it go in the tree
    return tree


def load_params(path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None,
                given_as: str = "--set", text: str | None = None) -> Params:  # fmt: skip
    """Returns the typed params from `path` (or its `text`, read already) with dotted overrides applied; keys it
    leaves out take their defaults. `given_as`: how an error names where an override came from (`--set KEY`,
    or a flow's `overrides KEY`)."""
    tree = params_tree(path, overrides, text)
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ParamsError(_one_line(str(path), exc, _culprits(path, overrides or {}, exc, text), given_as)) from None
