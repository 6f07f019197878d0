"""`imgclf init DIR`: a ready git + DVC project in DIR, whose pipeline code is the installed imgclf.

The project gets this repo's params.yaml (comments kept; `--url` sets data.url and empties
data.sha256), dvc.yaml (without the `tasks/...` code deps: there is no tasks/ folder in the
user's project), prefect.yaml (entrypoints as module paths of the installed flow) and the
pipeline-output lines of .gitignore. Nothing the folder already holds is overwritten.
"""

from __future__ import annotations

import io
import itertools
import re
import shlex
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path, PurePosixPath

import yaml

import flows
from tasks.errors import StageError
from tasks.layout import OWN_FOLDER
from tasks.params import ParamsError, load_params, url_scheme
from tasks.redact import HOLDS_CREDENTIALS, has_secret, redact

# The templates are this source tree's own files: `imgclf` is installed editable (pip install -e .),
# so the package's parent folder is the checkout. A wheel would not carry them (see _templates).
SOURCE = Path(flows.__file__).resolve().parents[1]
TEMPLATES = ("params.yaml", "dvc.yaml", "prefect.yaml", ".gitignore")
# Files that make a folder a pipeline project already: init refuses rather than overwrite them.
PROJECT_FILES = ("dvc.yaml", "params.yaml")
# What `dvc init` writes and stages.
DVC_FILES = (".dvc/config", ".dvc/.gitignore", ".dvcignore")
COMMIT_MESSAGE = "imgclf init"


class InitError(StageError):
    """`imgclf init` cannot make the project; the message names the folder, file or tool."""


class ProjectExistsError(InitError):
    """The folder already holds a dvc.yaml or params.yaml."""


class ToolMissingError(InitError):
    """git (from PATH) or DVC (in this interpreter) is not available."""


def init_project(folder: Path, url: str | None = None) -> list[str]:
    """Returns the lines to print after making `folder` a git + DVC imgclf project (created if missing).

    Refuses, before touching anything, a folder that holds a dvc.yaml or params.yaml, a bad
    `url`, or a machine without git. Commits the new files ("imgclf init") when git has a user
    identity; otherwise leaves them staged.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InitError(f"{folder}: exists and is not a folder")
    for name in PROJECT_FILES:
        if (folder / name).exists():
            raise ProjectExistsError(f"{folder / name}: already exists; imgclf init never overwrites a project's "
                                     "files (choose an empty or new folder)")  # fmt: skip
    git = shutil.which("git")
    if git is None:
        raise ToolMissingError("git: not found on PATH; imgclf init needs git (https://git-scm.com/downloads)")
    templates = _templates()
    url = _project_url(url, folder) if url is not None else None
    # Everything is rendered before the folder is touched: a template problem leaves nothing behind.
    params_text, dvc_text = _params_text(templates["params.yaml"], url), _dvc_text(templates["dvc.yaml"])
    prefect_text = _prefect_text(templates["prefect.yaml"])
    ignores = _output_ignores(templates[".gitignore"], templates["dvc.yaml"])

    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"Created an imgclf project in {folder}:"]
    if (folder / ".git").exists():
        lines.append("  .git/          already a git repository: kept")
    else:
        _call([git, "init", "-q"], folder, "git init")
        lines.append("  .git/          git init")
    dvc_ran = not (folder / ".dvc").exists()
    if dvc_ran:
        _call([sys.executable, "-m", "dvc", "init", "-q"], folder, "dvc init")
        lines.append("  .dvc/          dvc init")
    else:
        lines.append("  .dvc/          already a DVC project: kept")

    written: list[str] = []
    _create(folder / "params.yaml", params_text)
    written.append("params.yaml")
    lines.append("  params.yaml    every knob" + (f"; data.url: {url}, data.sha256 empty" if url is not None else
                                                 " (data.url: the malaria archive, 337 MB)"))  # fmt: skip
    _create(folder / "dvc.yaml", dvc_text)
    written.append("dvc.yaml")
    lines.append("  dvc.yaml       the pipeline: `imgclf stage NAME` per stage")
    if (folder / "prefect.yaml").exists():
        lines.append("  prefect.yaml   already there: kept as it is")
    else:
        _create(folder / "prefect.yaml", prefect_text)
        written.append("prefect.yaml")
        lines.append("  prefect.yaml   Prefect deployments (see the imgclf README, Deployments)")
    if _add_ignores(folder / ".gitignore", ignores):
        written.append(".gitignore")
        lines.append("  .gitignore     pipeline outputs that DVC caches, not git")

    _call([git, "add", "--", *written], folder, "git add")
    if _has_identity(git, folder):
        committed = written + [name for name in DVC_FILES if dvc_ran and (folder / name).exists()]
        _call([git, "commit", "-q", "-m", COMMIT_MESSAGE, "--", *committed], folder, "git commit")
        lines.append(f'Committed them: "{COMMIT_MESSAGE}".')
    else:
        lines.append("Staged, not committed: git has no user identity here (git config user.name / user.email);")
        lines.append(f'then commit them: git commit -m "{COMMIT_MESSAGE}"')
    lines += ["Next:", f"  cd {shlex.quote(str(folder))}", "  imgclf run"]
    return lines


def _templates() -> dict[str, str]:
    """Returns the text of each template file of the source tree, by name."""
    texts = {}
    for name in TEMPLATES:
        path = SOURCE / name
        try:
            texts[name] = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InitError(f"{path}: cannot read imgclf's {name} ({exc.strerror or exc}); imgclf init needs "
                            "imgclf installed from its source tree (pip install -e .)") from None  # fmt: skip
    return texts


def _project_url(url: str, folder: Path) -> str:
    """Returns `url` checked like data.url; a relative local path that exists from here made absolute.

    A relative path that does not exist here is kept: it is read from the project folder.
    """
    url = url.strip()
    if has_secret(url):  # params.yaml is committed and dvc.lock records it: a password would be in git
        raise ParamsError(f"--url: {redact(url)} {HOLDS_CREDENTIALS}, which "
                          "params.yaml and dvc.lock would keep in git: give the URL without them and put the "
                          "password in ~/.netrc, or pass a signed URL per run: imgclf run --set data.url=URL")
    try:
        load_params(SOURCE / "params.yaml", {"data.url": url, "data.sha256": None})
    except ParamsError as exc:
        said = str(exc).removeprefix(f"{SOURCE / 'params.yaml'}: ").removeprefix("--set data.url: data.url: ")
        raise ParamsError(f"--url: {said}") from None
    if url_scheme(url) == "" and not Path(url).is_absolute() and Path(url).exists() and not (folder / url).exists():
        return str(Path(url).resolve())
    return url


def _yaml():
    from ruamel.yaml import YAML

    yaml = YAML()  # round trip: comments, order and quoting kept
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)  # the layout of this repo's YAML files
    return yaml


def _dump(tree) -> str:
    buffer = io.StringIO()
    _yaml().dump(tree, buffer)
    return buffer.getvalue()


def _params_text(template: str, url: str | None) -> str:
    """Returns this repo's params.yaml, with data.url set to `url` and data.sha256 emptied when `url` is given."""
    if url is None:
        return template
    tree = _yaml().load(template)
    tree["data"]["url"] = url
    tree["data"]["sha256"] = None
    return _dump(tree)


DVC_HEADER = """\
# The imgclf pipeline, written by `imgclf init` (imgclf {version}): one stage per step.
# Each command is `imgclf stage NAME`, the same function `imgclf run` (the Prefect flow) runs.
# The stages' code is the installed imgclf, not a file in this project, so deps list data only:
# after upgrading imgclf, `dvc repro --force` re-runs every stage.
"""


def _dvc_text(template: str) -> str:
    """Returns this repo's dvc.yaml without its `tasks/...` code deps, under a header that says why."""
    tree = _yaml().load(template)
    for stage in tree["stages"].values():
        deps = stage.get("deps")
        if deps is None:
            continue
        for index in reversed(range(len(deps))):
            if isinstance(deps[index], str) and PurePosixPath(deps[index]).parts[0] == "tasks":
                del deps[index]
        if not deps:  # download: its params are its only dependencies
            del stage["deps"]
    body = _dump(tree)
    body = re.sub(r"\A(?:#[^\n]*\n)+", "", body)  # the repo's header speaks of tasks/stages.py
    return DVC_HEADER.format(version=_version()) + body


def _version() -> str:
    try:
        return metadata.version("imgclf")
    except metadata.PackageNotFoundError:
        return "source"


# Comments of prefect.yaml that speak of this repo; other comments hold outside it too.
PREFECT_COMMENTS = {
    "from the repo root": "from this folder",
    "(built from the Dockerfile)": "(built from imgclf's Dockerfile)",
}


def _prefect_text(template: str) -> str:
    """Returns this repo's prefect.yaml with `path/file.py:flow` entrypoints as module paths of the installed imgclf."""
    tree = _yaml().load(template)
    for deployment in tree.get("deployments") or []:
        entrypoint = deployment.get("entrypoint")
        if isinstance(entrypoint, str) and ".py:" in entrypoint:
            path, _, name = entrypoint.rpartition(":")
            deployment["entrypoint"] = ".".join(PurePosixPath(path).with_suffix("").parts + (name,))
    text = _dump(tree)
    for old, new in PREFECT_COMMENTS.items():
        text = text.replace(old, new)
    return text


def _output_ignores(template: str, pipeline: str) -> list[str]:
    """Returns the pipeline-output block of this repo's .gitignore: its comment and its entries.

    Entries outside the folders the pipeline writes (/benchmarks/.data/) name nothing a project has.
    """
    lines = template.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("#") and "pipeline output" in line.lower()), None)
    if start is None:
        raise InitError(f"{SOURCE / '.gitignore'}: no '# Pipeline outputs' block to copy")
    comment = list(itertools.takewhile(lambda line: line.startswith("#"), lines[start:]))
    entries = itertools.takewhile(lambda line: line.strip() and not line.startswith("#"), lines[start + len(comment) :])
    folders = _pipeline_folders(pipeline)
    return comment + [entry.strip() for entry in entries if PurePosixPath(entry.strip().strip("/")).parts[0] in folders]


def _pipeline_folders(pipeline: str) -> set[str]:
    """Returns the top folders of every path dvc.yaml names, .imgclf/ (the run's lock and params) and
    dvc_plots/ (the page `dvc plots show` writes)."""
    folders = {OWN_FOLDER, "dvc_plots"}
    for stage in yaml.safe_load(pipeline)["stages"].values():
        for key in ("deps", "outs", "metrics", "plots"):
            for item in stage.get(key) or []:
                for path in item if isinstance(item, dict) else [item]:
                    folders.add(PurePosixPath(path).parts[0])
    return folders


def _add_ignores(gitignore: Path, block: list[str]) -> bool:
    """Appends the lines of `block` the file lacks (creating it); returns whether it changed."""
    existing = gitignore.read_text(encoding="utf-8") if gitignore.exists() else ""
    have = {line.strip() for line in existing.splitlines()}
    missing = [line for line in block if not line.startswith("#") and line not in have]
    if not missing:
        return False
    comment = [line for line in block if line.startswith("#")]
    separator = "" if not existing else "\n" if existing.endswith("\n") else "\n\n"  # a blank line between
    with open(gitignore, "a", encoding="utf-8") as handle:
        handle.write(separator + "\n".join([*comment, *missing]) + "\n")
    return True


def _create(path: Path, text: str) -> None:
    """Writes a new file; never replaces one (the folder was checked, this closes the race)."""
    try:
        with open(path, "x", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError:
        raise ProjectExistsError(f"{path}: already exists; imgclf init never overwrites a project's files") from None


def _has_identity(git: str, folder: Path) -> bool:
    """Returns whether git has a user name and email for author and committer, from config or environment.

    `user.useConfigOnly` stops git from making one up from the login and host name.
    """
    for ident in ("GIT_AUTHOR_IDENT", "GIT_COMMITTER_IDENT"):
        probe = subprocess.run([git, "-c", "user.useConfigOnly=true", "var", ident], cwd=folder,
                               capture_output=True, text=True)  # fmt: skip
        if probe.returncode != 0:
            return False
    return True


def _call(command: list[str], folder: Path, what: str) -> None:
    """Runs `command` in `folder`; a failure raises with the command's last line of output."""
    try:
        result = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    except OSError as exc:
        raise ToolMissingError(f"{what}: cannot run {command[0]} ({exc.strerror or exc})") from None
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip() or f"exit status {result.returncode}").splitlines()
        raise InitError(f"{folder}: {what} failed: {output[-1].strip()}")
