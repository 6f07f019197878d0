"""Stage extract: a zip or tar(.gz) archive -> `data/extracted/`, safely.

Entries that would land outside the target (absolute paths, `..`), links, devices, zip
entries Python cannot read (encrypted, Deflate64) and OS junk are never written; each is a row of `data/extract_skipped.csv` with its reason. The
uncompressed total is capped by `data.max_extract_bytes`, both as declared and as actually
written, so a zip bomb stops the stage. Files go to a temporary directory that replaces
`data/extracted/` only when every entry is written; a tar cut short stops the stage first.
A single top folder (`cell_images/`) is stripped, so the class folders sit at the root and
their names are the labels; loose files above them and second copies of the class tree are
skipped, never made classes.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tarfile
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tasks.archives import (ZIP_MAGIC, found_a_zip_inside, is_broken_archive, no_tar_problem, tar_end_problem,
                            zip_end_missing)
from tasks.errors import StageError
from tasks.files import CHUNK, atomic_dir, shown_name, write_csv
from tasks.params import DataParams

log = logging.getLogger("imgclf")

JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
JUNK_DIRS = {"__macosx"}  # and hidden folders beside others (.git, .ipynb_checkpoints): _hidden_beside_others
NAME_MAX = 255  # bytes in one path component, on the file systems people use
# bytes in an entry's path: Linux's PATH_MAX is 4096 with the project's own folders in front
PATH_BYTES_MAX = 1024
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
REFUSED_KINDS = ("symlink", "hardlink", "device", "encrypted", "unsupported_compression")


class ExtractError(StageError, RuntimeError):
    """The archive cannot be extracted; the message names the archive and the reason."""


@dataclass(frozen=True)
class Entry:
    name: str  # as written in the archive
    parts: tuple[str, ...]  # its path, split on / and \
    size: int  # declared uncompressed size
    kind: str  # file | dir | symlink | hardlink | device
    member: object  # ZipInfo or TarInfo, to open it


def extract(data: DataParams, archive: Path, out_dir: Path, skipped_csv: Path) -> Path:
    """Returns `out_dir`, filled with the archive's safe regular files; refusals go to `skipped_csv`."""
    try:
        skipped, kept = _extract(data, archive, out_dir)
    except Exception as exc:
        if not is_broken_archive(exc):
            raise
        raise ExtractError(f"{archive}: corrupt archive ({type(exc).__name__}: {exc}); nothing was kept") from None
    write_csv(skipped_csv, ["entry", "reason"], sorted(skipped))
    reasons = dict(Counter(reason for _, reason in skipped))
    log.info("extract: %d files into %s; skipped %s", kept, out_dir, reasons or "none")
    return out_dir


def _extract(data: DataParams, archive: Path, out_dir: Path) -> tuple[list[tuple[str, str]], int]:
    with _open_archive(archive) as (entries, open_member):
        keep, skipped = _sort_entries(entries)
        if not keep:
            reasons = dict(Counter(reason for _, reason in skipped)) or "none"
            raise ExtractError(f"{archive}: no files inside class folders (skipped {reasons}); nothing was kept")
        declared = sum(entry.size for entry, _ in keep)
        if declared > data.max_extract_bytes:
            raise ExtractError(
                f"{archive}: declares {declared} uncompressed bytes, over data.max_extract_bytes "
                f"({data.max_extract_bytes}); nothing was extracted"
            )
        written = 0
        with atomic_dir(out_dir) as temp:
            for entry, relative in keep:
                target = temp.joinpath(*relative)
                target.parent.mkdir(parents=True, exist_ok=True)
                with open_member(entry) as reader, open(target, "wb") as writer:
                    while chunk := reader.read(CHUNK):
                        written += len(chunk)
                        if written > data.max_extract_bytes:
                            raise ExtractError(
                                f"{archive}: expands past data.max_extract_bytes ({data.max_extract_bytes}) "
                                f"at {entry.name!r} (a zip bomb?); nothing was kept"
                            )
                        writer.write(chunk)
    return skipped, len(keep)


@contextmanager
def _open_archive(archive: Path) -> Iterator[tuple[list[Entry], object]]:
    if not archive.is_file():
        raise ExtractError(f"{archive}: no such archive (run the download stage first)")
    # Sniff the first bytes, not the extension: a renamed archive still opens. (zipfile's own
    # test looks at the end of the file, where a tar holding a .zip also ends in one.)
    with open(archive, "rb") as handle:
        magic = handle.read(4)
    if magic in ZIP_MAGIC:
        try:
            zf = zipfile.ZipFile(archive)
        except zipfile.BadZipFile:
            if not zip_end_missing(archive):
                raise  # damaged, not cut short: a corrupt archive, with zipfile's reason
            # It starts as a zip but has no end: the central directory a zip keeps last is gone.
            raise ExtractError(f"{archive}: truncated archive: a zip without its end (central directory), "
                               "cut short?; nothing was kept") from None  # fmt: skip
        except UnicodeDecodeError as exc:  # zipfile reads every name at once: one bad name stops them all
            raise ExtractError(f"{archive}: corrupt archive: an entry name marked UTF-8 is not UTF-8 "
                               f"({exc.object[:60]!r}); nothing was kept") from None  # fmt: skip
        if found_a_zip_inside(zf):
            zf.close()
            raise ExtractError(f"{archive}: truncated archive: its central directory is missing, and the last one "
                               "in the file is a zip stored inside it; nothing was kept")  # fmt: skip
        with zf:
            yield [_zip_entry(info) for info in zf.infolist()], lambda e: zf.open(e.member)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            try:
                members = tf.getmembers()
                # tarfile stops quietly where a header is cut short: only the missing end block tells.
                problem = tar_end_problem(tf)
            except tarfile.ReadError as exc:  # what it says when the last member's data is cut short
                problem = f"truncated archive: {exc} in {tf.members[-1].name!r}"
            if problem:
                raise ExtractError(f"{archive}: {problem}; nothing was kept")
            yield [_tar_entry(info) for info in members], lambda e: _tar_reader(tf, e)
    else:
        raise ExtractError(f"{archive}: {no_tar_problem(archive)}")


def _split(name: str) -> tuple[str, ...]:
    return tuple(part for part in re.split(r"[/\\]", name) if part not in ("", "."))


def _zip_entry(info: zipfile.ZipInfo) -> Entry:
    # Unix zips keep st_mode in the high bits; many tools store permissions only (no type).
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if info.is_dir():
        kind = "dir"
    elif file_type == stat.S_IFLNK:
        kind = "symlink"
    elif file_type not in (0, stat.S_IFREG):
        kind = "device"
    elif info.flag_bits & 0x1:
        kind = "encrypted"
    elif info.compress_type not in ZIP_METHODS:
        kind = "unsupported_compression"  # Deflate64 (Windows Explorer, 7-Zip), PPMd, ...
    else:
        kind = "file"
    name = info.filename
    if not info.flag_bits & 0x800:
        # Info-ZIP's zip writes UTF-8 names without the flag that says so; zipfile then reads cp437.
        try:
            name = name.encode("cp437").decode("utf-8")
        except UnicodeError:
            pass
    return Entry(name, _split(name), info.file_size, kind, info)


def _tar_entry(info: tarfile.TarInfo) -> Entry:
    if info.isdir():
        kind = "dir"
    elif info.issym():
        kind = "symlink"
    elif info.islnk():
        kind = "hardlink"
    elif info.isfile():
        kind = "file"
    else:
        kind = "device"
    return Entry(info.name, _split(info.name), info.size, kind, info)


def _tar_reader(tf: tarfile.TarFile, entry: Entry) -> IO[bytes]:
    reader = tf.extractfile(entry.member)  # type: ignore[arg-type]
    assert reader is not None  # only regular files reach here
    return reader


def _refusal(entry: Entry) -> str | None:
    if entry.kind in REFUSED_KINDS:
        return entry.kind
    if entry.name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", entry.name):
        return "absolute_path"
    if ".." in entry.parts:
        return "path_traversal"
    if not entry.parts:
        return None if entry.kind == "dir" else "empty_name"  # `./`, the root of `tar -C dir .`
    if not entry.name.isascii() and shown_name(entry.name) != entry.name:
        return "bad_name"  # a tar name that is not UTF-8: no label can be read from it, and DVC cannot hash it
    sizes = [len(part.encode("utf-8", "surrogateescape")) for part in entry.parts]
    if max(sizes) > NAME_MAX or sum(sizes) + len(sizes) > PATH_BYTES_MAX:
        return "name_too_long"
    return None


def _is_junk(parts: tuple[str, ...]) -> bool:
    lowered = [part.lower() for part in parts]
    return (
        any(part in JUNK_DIRS for part in lowered)
        or lowered[-1] in JUNK_NAMES
        or parts[-1].startswith("._")  # macOS AppleDouble resource forks
    )


def _hidden_beside_others(files: list[tuple[str, ...]]) -> set[tuple[str, ...]]:
    """Returns the files inside a hidden folder (.git, .ipynb_checkpoints) that has other files beside it,
    where it would be a class of its own or a folder in one; not one that holds every file (.keras/datasets/)."""
    # Loose files at the root (a README beside .keras/) say nothing of where the classes are.
    folders = [parts[:-1] for parts in files if len(parts) > 1]
    shared = os.path.commonprefix(folders) if folders else ()
    return {parts for parts in files if any(part.startswith(".") for part in parts[len(shared) : -1])}


def _in_a_folder_below(parts: tuple[str, ...], root: tuple[str, ...]) -> bool:
    return parts[: len(root)] == root and len(parts) > len(root) + 1


def _class_root(files: list[tuple[str, ...]], root: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Returns the folder whose subfolders are the classes: single top folders are stepped into."""
    while True:
        # Files loose beside a top folder say nothing about where the classes are.
        inside = [parts[len(root) :] for parts in files if _in_a_folder_below(parts, root)]
        if len({rel[0] for rel in inside}) != 1:
            return root
        folders = {rel[1] for rel in inside if len(rel) > 2}
        if not folders:
            return root
        below = root + (inside[0][0],)
        if len(folders) == 1 and any(len(rel) == 2 for rel in inside):
            # Loose files and one subfolder: a class with a subfolder, unless two or more classes lie
            # further down (flowers/LICENSE.txt beside flowers/images/{daisy,rose}/).
            deeper = _class_root(files, below)
            tops = {parts[len(deeper)] for parts in files if _in_a_folder_below(parts, deeper)}
            return deeper if len(tops) > 1 else root
        root = below


def _nested_copies(files: list[tuple[str, ...]]) -> set[str]:
    """Returns the class folders (files given from the class root) that hold only folders named like other classes."""
    children: dict[str, set[str]] = defaultdict(set)
    for parts in files:
        children[parts[0]].add(parts[1])
    return {top for top, names in children.items() if names <= set(children) - {top}}


def _sort_entries(entries: list[Entry]) -> tuple[list[tuple[Entry, tuple[str, ...]]], list[tuple[str, str]]]:
    """Returns (files to write with their relative parts, (entry, reason) rows of what is skipped)."""
    skipped: list[tuple[str, str]] = []
    files: list[Entry] = []
    for entry in entries:
        reason = _refusal(entry)
        if reason is None and entry.kind == "dir":
            continue
        if reason is None and _is_junk(entry.parts):
            reason = "os_junk"
        if reason is None:
            files.append(entry)
        else:
            skipped.append((shown_name(entry.name), reason))
    hidden = _hidden_beside_others([e.parts for e in files])
    skipped += [(shown_name(e.name), "os_junk") for e in files if e.parts in hidden]
    files = [e for e in files if e.parts not in hidden]
    root = _class_root([e.parts for e in files])
    # Some mirrors nest a second full copy (cell_images/cell_images/, or one beside the classes).
    copies = _nested_copies([e.parts[len(root) :] for e in files if _in_a_folder_below(e.parts, root)])
    keep: list[tuple[Entry, tuple[str, ...]]] = []
    seen: set[tuple[str, ...]] = set()
    for entry in reversed(files):  # the last copy of a path wins, as tar and unzip extract them
        relative = entry.parts[len(root) :]
        if not _in_a_folder_below(entry.parts, root):
            skipped.append((entry.name, "outside_class_folders"))
        elif relative[0] in copies:
            skipped.append((entry.name, "nested_copy"))
        elif relative in seen:
            skipped.append((entry.name, "duplicate_entry"))
        else:
            seen.add(relative)
            keep.append((entry, relative))
    keep.reverse()
    # `x` and `x/y.png` cannot both be written: the folder's files win, the lone file is skipped.
    folders = {relative[:depth] for _, relative in keep for depth in range(1, len(relative))}
    skipped += [(entry.name, "file_folder_conflict") for entry, relative in keep if relative in folders]
    return [(entry, relative) for entry, relative in keep if relative not in folders], skipped
