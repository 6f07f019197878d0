"""The extract stage on hostile archives built here: refusals recorded, nothing outside out_dir, bombs stopped."""

from __future__ import annotations

import csv
import io
import os
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from tasks.extract import ExtractError, extract
from tasks.params import DataParams

PNG = b"\x89PNG\r\n\x1a\n" + b"fake image bytes"


# ---------------------------------------------------------------- helpers


def params(max_extract_bytes: int = 2_000_000_000) -> DataParams:
    return DataParams(url="unused.zip", max_extract_bytes=max_extract_bytes)


def make_zip(path: Path, entries: list) -> Path:
    """Entries: (name, bytes) for a regular file, or (ZipInfo, bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    return path


def zip_special(name: str, data: bytes, file_type: int = stat.S_IFLNK) -> tuple[zipfile.ZipInfo, bytes]:
    """A zip entry whose Unix mode (high bits of external_attr) says symlink, fifo, ...: data is the link target."""
    info = zipfile.ZipInfo(name)
    info.external_attr = (file_type | 0o777) << 16
    return info, data


def tar_member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, (io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_tar(path: Path, members: list, mode: str = "w:gz") -> Path:
    """Members: (name, bytes) for a regular file, or a tar_member(...) tuple."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode) as tf:
        for member in members:
            if isinstance(member[0], str):
                member = tar_member(*member)
            tf.addfile(*member)
    return path


def run(archive: Path, out_dir: Path, max_extract_bytes: int = 2_000_000_000) -> list[tuple[str, str]]:
    """Extracts and returns the skipped rows as (entry, reason)."""
    skipped_csv = out_dir.parent / "extract_skipped.csv"
    assert extract(params(max_extract_bytes), archive, out_dir, skipped_csv) == out_dir
    with open(skipped_csv, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["entry", "reason"]
    return [tuple(row) for row in rows[1:]]


def tree(root: Path) -> dict[str, bytes]:
    """Relative posix path -> bytes of every file under root; links and special files are marked as such."""
    files = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        if path.is_symlink():
            files[name] = b"<symlink>"
        elif path.is_file():
            files[name] = path.read_bytes()
        elif not path.is_dir():
            files[name] = b"<special file>"
    return files


def files_outside(tmp_path: Path, out_dir: Path, allowed: set[Path]) -> list[Path]:
    """Every file or link under tmp_path that is neither in out_dir nor one of `allowed`."""
    stray = []
    for dirpath, dirnames, filenames in os.walk(tmp_path):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath, name)
            if path not in allowed and out_dir not in path.parents:
                stray.append(path)
    return stray


def temp_dirs_beside(out_dir: Path) -> list[str]:
    """Names starting with '.' beside out_dir: temporary or retired directories left behind."""
    if not out_dir.parent.exists():
        return []
    return sorted(p.name for p in out_dir.parent.iterdir() if p.name.startswith("."))


@pytest.fixture
def work(tmp_path) -> Path:
    """out_dir two levels below tmp_path, so `..` from it still lands inside tmp_path where we can look."""
    return tmp_path / "data" / "extracted"


# ---------------------------------------------------------------- hostile entries


# Each folder name is fine; the whole path is past what later stages can open beside the project's folders.
LONG_PATH = "Parasitized/" + "/".join(["d" * 200] * 6) + "/deep.png"


def hostile_cases(tmp_path: Path) -> dict[str, tuple[str, list, str, str]]:
    """id -> (archive kind, hostile entries, hostile entry name as recorded, reason)."""
    outside = tmp_path / "outside"
    abs_name = f"{outside}/abs.png"  # absolute, but inside tmp_path so we can check it was not written
    return {
        "zip-slip": ("zip", [("../evil.png", PNG)], "../evil.png", "path_traversal"),
        "zip-slip-deep": ("zip", [("Parasitized/../../../evil.png", PNG)], "Parasitized/../../../evil.png",
                          "path_traversal"),
        "zip-slip-backslash": ("zip", [("..\\evil.png", PNG)], "..\\evil.png", "path_traversal"),
        "zip-absolute": ("zip", [(abs_name, PNG)], abs_name, "absolute_path"),
        "zip-drive-letter": ("zip", [("C:\\evil.png", PNG)], "C:\\evil.png", "absolute_path"),
        "zip-symlink": ("zip", [zip_special("Parasitized/link.png", str(tmp_path / "secret.txt").encode())],
                        "Parasitized/link.png", "symlink"),
        "zip-fifo": ("zip", [zip_special("Parasitized/pipe.png", b"", stat.S_IFIFO)], "Parasitized/pipe.png", "device"),
        "tar-slip": ("tar", [("../evil.png", PNG)], "../evil.png", "path_traversal"),
        "tar-absolute": ("tar", [(abs_name, PNG)], abs_name, "absolute_path"),
        "tar-symlink": ("tar", [tar_member("Parasitized/link.png", kind=tarfile.SYMTYPE,
                                           linkname=str(tmp_path / "secret.txt"))],
                        "Parasitized/link.png", "symlink"),
        "tar-symlink-dir": ("tar", [tar_member("Uninfected/up", kind=tarfile.SYMTYPE, linkname="../..")],
                            "Uninfected/up", "symlink"),
        "tar-hardlink": ("tar", [tar_member("Parasitized/hard.png", kind=tarfile.LNKTYPE,
                                            linkname=str(tmp_path / "secret.txt"))],
                         "Parasitized/hard.png", "hardlink"),
        "tar-fifo": ("tar", [tar_member("Parasitized/pipe.png", kind=tarfile.FIFOTYPE)],
                     "Parasitized/pipe.png", "device"),
        "tar-chardev": ("tar", [tar_member("Parasitized/null.png", kind=tarfile.CHRTYPE)],
                        "Parasitized/null.png", "device"),
        "tar-long-path": ("tar", [(LONG_PATH, PNG)], LONG_PATH, "name_too_long"),
        "tar-name-not-utf8": ("tar", [(b"Parasitized/bad\xff\xfe.png".decode("utf-8", "surrogateescape"), PNG)],
                              "Parasitized/bad\\xff\\xfe.png", "bad_name"),
    }  # fmt: skip


HOSTILE_IDS = list(hostile_cases(Path("/x")))


@pytest.mark.parametrize("case", HOSTILE_IDS)
def test_hostile_entry_is_refused_recorded_and_nothing_lands_outside(tmp_path, work, case):
    kind, hostile, recorded_name, reason = hostile_cases(tmp_path)[case]
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"do not copy me")
    good = [("Parasitized/good.png", PNG), ("Uninfected/good.png", PNG + b"2")]
    archive = tmp_path / "in" / ("a.zip" if kind == "zip" else "a.tar.gz")
    (make_zip if kind == "zip" else make_tar)(archive, good[:1] + hostile + good[1:])

    skipped = run(archive, work)

    assert skipped == [(recorded_name, reason)]
    assert tree(work) == {"Parasitized/good.png": PNG, "Uninfected/good.png": PNG + b"2"}
    allowed = {archive, secret, work.parent / "extract_skipped.csv"}
    assert files_outside(tmp_path, work, allowed) == []
    assert temp_dirs_beside(work) == []


# ---------------------------------------------------------------- zip bombs


def bomb_zip(path: Path, size: int = 5_000_000) -> Path:
    """A highly compressible entry: a few KB on disk, `size` bytes uncompressed."""
    return make_zip(path, [("Parasitized/ok.png", PNG), ("Parasitized/bomb.png", b"\0" * size)])


def zip_headers(archive: Path, entry: str) -> tuple[bytearray, int, int]:
    """The archive's bytes, and the offsets of `entry`'s local and central headers in them."""
    with zipfile.ZipFile(archive) as zf:
        local_offset = zf.getinfo(entry).header_offset
    raw = bytearray(archive.read_bytes())
    assert raw[local_offset : local_offset + 4] == b"PK\x03\x04"
    central = raw.rfind(b"PK\x01\x02")
    while central != -1:
        name_len = struct.unpack_from("<H", raw, central + 28)[0]
        if raw[central + 46 : central + 46 + name_len] == entry.encode():
            return raw, local_offset, central
        central = raw.rfind(b"PK\x01\x02", 0, central)
    raise AssertionError("central header not found")


def forge_zip_entry(archive: Path, entry: str, flip_flags: int = 0, method: int | None = None) -> Path:
    """Flips general-purpose flag bits of `entry` (and sets its compression method) in both headers."""
    raw, local, central = zip_headers(archive, entry)
    for flags_at, method_at in ((local + 6, local + 8), (central + 8, central + 10)):
        struct.pack_into("<H", raw, flags_at, struct.unpack_from("<H", raw, flags_at)[0] ^ flip_flags)
        if method is not None:
            struct.pack_into("<H", raw, method_at, method)
    archive.write_bytes(bytes(raw))
    return archive


def forge_declared_sizes(archive: Path, entry: str, declared: int) -> Path:
    """Rewrites the uncompressed size of `entry` in both its local and central headers: the sizes lie."""
    raw, local_offset, central = zip_headers(archive, entry)
    raw[local_offset + 22 : local_offset + 26] = struct.pack("<I", declared)
    raw[central + 24 : central + 28] = struct.pack("<I", declared)
    archive.write_bytes(bytes(raw))
    with zipfile.ZipFile(archive) as zf:
        assert zf.getinfo(entry).file_size == declared
    return archive


def good_extraction(tmp_path: Path, work: Path) -> dict[str, bytes]:
    run(make_zip(tmp_path / "in" / "good.zip", [("Parasitized/old.png", PNG), ("Uninfected/old.png", PNG)]), work)
    return tree(work)


def test_declared_size_over_cap_raises_before_writing_and_leaves_no_out_dir(tmp_path, work):
    archive = bomb_zip(tmp_path / "in" / "bomb.zip")
    assert archive.stat().st_size < 100_000
    declared = len(PNG) + 5_000_000
    with pytest.raises(ExtractError, match=f"declares {declared} uncompressed bytes.*max_extract_bytes") as raised:
        extract(params(1_000_000), archive, work, tmp_path / "data" / "skipped.csv")
    assert str(archive) in str(raised.value)
    assert not work.exists()
    assert not (tmp_path / "data" / "skipped.csv").exists()
    assert temp_dirs_beside(work) == []


def test_declared_size_over_cap_keeps_previous_complete_extraction(tmp_path, work):
    before = good_extraction(tmp_path, work)
    archive = bomb_zip(tmp_path / "in" / "bomb.zip")
    with pytest.raises(ExtractError, match="declares .*max_extract_bytes"):
        extract(params(1_000_000), archive, work, tmp_path / "data" / "skipped.csv")
    assert tree(work) == before
    assert temp_dirs_beside(work) == []


def test_tar_members_each_under_cap_but_summing_past_it_raise(tmp_path, work):
    chunk = os.urandom(400_000)
    archive = make_tar(tmp_path / "in" / "a.tar", [(f"Parasitized/{i}.png", chunk) for i in range(3)], mode="w")
    with pytest.raises(ExtractError, match="max_extract_bytes"):
        extract(params(1_000_000), archive, work, tmp_path / "data" / "skipped.csv")
    assert not work.exists()
    assert temp_dirs_beside(work) == []


def test_total_exactly_at_cap_is_extracted(tmp_path, work):
    archive = make_zip(tmp_path / "in" / "a.zip", [("Parasitized/a.png", b"x" * 600), ("Uninfected/b.png", b"y" * 400)])
    run(archive, work, max_extract_bytes=1000)
    assert tree(work) == {"Parasitized/a.png": b"x" * 600, "Uninfected/b.png": b"y" * 400}


def test_zip_with_lying_declared_size_stops_and_keeps_previous_extraction(tmp_path, work):
    before = good_extraction(tmp_path, work)
    archive = forge_declared_sizes(bomb_zip(tmp_path / "in" / "liar.zip"), "Parasitized/bomb.png", 100)
    with pytest.raises(ExtractError):
        extract(params(1_000_000), archive, work, tmp_path / "data" / "skipped.csv")
    assert tree(work) == before
    assert temp_dirs_beside(work) == []
    allowed = {archive, tmp_path / "in" / "good.zip", work.parent / "extract_skipped.csv"}
    assert files_outside(tmp_path, work, allowed) == []


def test_zip_with_lying_declared_size_raises_extract_error_naming_archive(tmp_path, work):
    archive = forge_declared_sizes(bomb_zip(tmp_path / "in" / "liar.zip"), "Parasitized/bomb.png", 100)
    with pytest.raises(ExtractError, match="liar.zip"):
        extract(params(1_000_000), archive, work, tmp_path / "data" / "skipped.csv")


def test_truncated_tar_gz_raises_extract_error_naming_archive(tmp_path, work):
    full = make_tar(tmp_path / "in" / "full.tar.gz", [(f"Parasitized/{i}.png", os.urandom(50_000)) for i in range(4)])
    cut = tmp_path / "in" / "cut.tar.gz"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ExtractError, match="cut.tar.gz"):
        extract(params(), cut, work, tmp_path / "data" / "skipped.csv")


def test_truncated_tar_gz_leaves_no_out_dir_and_no_temp_dirs(tmp_path, work):
    full = make_tar(tmp_path / "in" / "full.tar.gz", [(f"Parasitized/{i}.png", os.urandom(50_000)) for i in range(4)])
    cut = tmp_path / "in" / "cut.tar.gz"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ExtractError):
        extract(params(), cut, work, tmp_path / "data" / "skipped.csv")
    assert not work.exists()
    assert temp_dirs_beside(work) == []


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
@pytest.mark.parametrize("member", [0, 3])
def test_a_compressed_tar_with_a_damaged_byte_is_refused_by_download_s_check_and_extract(tmp_path, work, mode, member):
    # Random member data compresses to itself: a byte flipped inside it still decompresses, and only the stream's
    # checksum, read at its end (gzip) or a block's (bzip2, xz), tells.
    from tasks.archives import completeness_problem

    members = [(f"Parasitized/{i}.png", os.urandom(300_000)) for i in range(4)]
    full = make_tar(tmp_path / "in" / f"full.tar.{mode[2:]}", members, mode)
    damaged = bytearray(full.read_bytes())
    damaged[len(damaged) * (2 * member + 1) // 8] ^= 0xFF
    archive = tmp_path / "in" / f"damaged.tar.{mode[2:]}"
    archive.write_bytes(bytes(damaged))
    assert completeness_problem(full) is None
    assert completeness_problem(archive).startswith("damaged or truncated archive (")
    with pytest.raises(ExtractError, match=r"damaged.tar.\w+: (corrupt|damaged or truncated) archive \(\w+: .+\)"):
        extract(params(), archive, work, tmp_path / "data" / "skipped.csv")
    assert not work.exists()


def tar_cut(full: Path, where: str) -> bytes:
    """The bytes of an uncompressed tar cut short at `where`, relative to its last member."""
    with tarfile.open(full) as tf:
        last = tf.getmembers()[-1]
    padded_end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    cut = {"at_a_member_header": last.offset, "inside_a_header_block": last.offset + 100,
           "inside_the_last_member_data": last.offset_data + 10, "without_end_blocks": padded_end}[where]  # fmt: skip
    return full.read_bytes()[:cut]


@pytest.mark.parametrize("where", ["at_a_member_header", "inside_a_header_block", "inside_the_last_member_data",
                                   "without_end_blocks"])  # fmt: skip
def test_tar_cut_short_is_refused_as_truncated_and_keeps_previous_extraction(tmp_path, work, where):
    before = good_extraction(tmp_path, work)
    members = [(f"Parasitized/{i}.png", os.urandom(700)) for i in range(3)]
    full = make_tar(tmp_path / "in" / "full.tar", members, mode="w")
    cut = tmp_path / "in" / "cut.tar"
    cut.write_bytes(tar_cut(full, where))
    with pytest.raises(ExtractError, match=r"cut\.tar: truncated archive: .*; nothing was kept$"):
        extract(params(), cut, work, tmp_path / "data" / "skipped.csv")
    assert tree(work) == before
    assert temp_dirs_beside(work) == []


# ---------------------------------------------------------------- OS junk, duplicates


def test_os_junk_is_skipped_and_recorded(tmp_path, work):
    junk = ["__MACOSX/Parasitized/._a.png", "__MACOSX/._Parasitized", "Parasitized/.DS_Store", "Uninfected/Thumbs.db",
            "Uninfected/THUMBS.DB", "Uninfected/desktop.ini", "Parasitized/._foo.png",
            # hidden folders (a notebook's autosaves, a git repo), which would be classes of their own
            ".ipynb_checkpoints/a-checkpoint.png", "Uninfected/.ipynb_checkpoints/b-checkpoint.png", ".git/objects/ab"]  # fmt: skip
    archive = make_zip(tmp_path / "in" / "a.zip", [("Parasitized/a.png", PNG), ("Uninfected/b.png", PNG)]
                       + [(name, b"junk") for name in junk])  # fmt: skip
    skipped = run(archive, work)
    assert sorted(skipped) == sorted((name, "os_junk") for name in junk)
    assert tree(work) == {"Parasitized/a.png": PNG, "Uninfected/b.png": PNG}


def test_a_hidden_folder_that_holds_every_file_is_a_folder_like_any_other(tmp_path, work):
    # Keras' download cache, zipped as it is: the classes are below it, and a checkpoint folder among them is junk.
    top = ".keras/datasets/flower_photos"
    archive = make_zip(tmp_path / "in" / "a.zip", [(f"{top}/daisy/a.png", PNG), (f"{top}/roses/b.png", PNG),
                                                    (f"{top}/roses/.ipynb_checkpoints/b.png", b"junk"),
                                                    ("README.txt", b"loose, at the root")])  # fmt: skip
    assert sorted(run(archive, work)) == [(f"{top}/roses/.ipynb_checkpoints/b.png", "os_junk"),
                                          ("README.txt", "outside_class_folders")]  # fmt: skip
    assert tree(work) == {"daisy/a.png": PNG, "roses/b.png": PNG}


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_same_path_spelled_twice_is_written_once_the_last_copy_as_tar_and_unzip_do(tmp_path, work, kind):
    # `tar -rf` appends an updated file: the later copy is the one meant.
    entries = [("Parasitized/a.png", PNG), ("./Parasitized//a.png", b"newer"), ("Uninfected/b.png", PNG)]
    archive = (make_zip if kind == "zip" else make_tar)(tmp_path / "in" / f"a.{kind}", entries)
    skipped = run(archive, work)
    assert skipped == [("Parasitized/a.png", "duplicate_entry")]
    assert tree(work) == {"Parasitized/a.png": b"newer", "Uninfected/b.png": PNG}


def test_the_root_entry_of_tar_c_dot_is_not_recorded_as_skipped(tmp_path, work):
    archive = make_tar(tmp_path / "in" / "a.tar", [tar_member(".", kind=tarfile.DIRTYPE), ("./cat/1.png", PNG),
                                                   ("./dog/2.png", PNG)])  # fmt: skip
    assert run(archive, work) == []
    assert tree(work) == {"cat/1.png": PNG, "dog/2.png": PNG}


@pytest.mark.parametrize("reason, forgery", [("encrypted", {"flip_flags": 0x1}),
                                             ("unsupported_compression", {"method": 9})])  # Deflate64
def test_zip_entry_zipfile_cannot_read_is_refused_and_recorded(tmp_path, work, reason, forgery):
    good = [("Parasitized/good.png", PNG), ("Uninfected/good.png", PNG)]
    archive = make_zip(tmp_path / "in" / "a.zip", good + [("Parasitized/locked.png", PNG)])
    forge_zip_entry(archive, "Parasitized/locked.png", **forgery)
    assert run(archive, work) == [("Parasitized/locked.png", reason)]
    assert tree(work) == dict(good)


def test_utf8_names_without_the_utf8_flag_keep_their_letters(tmp_path, work):
    # What Info-ZIP's `zip` writes: UTF-8 bytes, flag 0x800 unset (zipfile alone reads them as cp437).
    names = ["Cats é/1.png", "dogs 文/2.png"]
    archive = make_zip(tmp_path / "in" / "a.zip", [(name, PNG) for name in names])
    for name in names:
        forge_zip_entry(archive, name, flip_flags=0x800)
    assert run(archive, work) == []
    assert tree(work) == {name: PNG for name in names}


# ---------------------------------------------------------------- top folder


def test_single_top_folder_is_stripped(tmp_path, work):
    archive = make_zip(tmp_path / "in" / "a.zip", [("cell_images/", b""), ("cell_images/Parasitized/a.png", PNG),
                                                   ("cell_images/Uninfected/b.png", PNG)])  # fmt: skip
    assert run(archive, work) == []
    assert tree(work) == {"Parasitized/a.png": PNG, "Uninfected/b.png": PNG}


def test_single_class_under_top_folder_keeps_its_class_folder(tmp_path, work):
    archive = make_zip(tmp_path / "in" / "a.zip", [("cell_images/Parasitized/a.png", PNG)])
    run(archive, work)
    assert tree(work) == {"Parasitized/a.png": PNG}


def test_nested_copy_of_top_folder_is_skipped_as_nested_copy(tmp_path, work):
    archive = make_zip(tmp_path / "in" / "a.zip", [
        ("cell_images/Parasitized/a.png", PNG), ("cell_images/Uninfected/b.png", PNG),
        ("cell_images/cell_images/Parasitized/a.png", PNG), ("cell_images/cell_images/Uninfected/b.png", PNG),
    ])  # fmt: skip
    skipped = run(archive, work)
    assert sorted(skipped) == [("cell_images/cell_images/Parasitized/a.png", "nested_copy"),
                               ("cell_images/cell_images/Uninfected/b.png", "nested_copy")]  # fmt: skip
    assert tree(work) == {"Parasitized/a.png": PNG, "Uninfected/b.png": PNG}


def test_class_folders_at_the_root_are_not_stripped(tmp_path, work):
    archive = make_zip(tmp_path / "in" / "a.zip", [("cat/1.png", PNG), ("dog/2.png", PNG)])
    assert run(archive, work) == []
    assert tree(work) == {"cat/1.png": PNG, "dog/2.png": PNG}


def test_junk_beside_top_folder_does_not_stop_stripping(tmp_path, work):
    archive = make_zip(tmp_path / "in" / "a.zip", [("cell_images/Parasitized/a.png", PNG),
                                                   ("__MACOSX/cell_images/._x", b""),
                                                   ("cell_images/Uninfected/b.png", PNG)])  # fmt: skip
    run(archive, work)
    assert tree(work) == {"Parasitized/a.png": PNG, "Uninfected/b.png": PNG}


@pytest.mark.parametrize("loose", ["cell_images/README.txt", "README.txt"])
def test_loose_file_beside_the_top_folder_does_not_change_labels(tmp_path, work, loose):
    archive = make_zip(tmp_path / "in" / "a.zip", [(loose, b"read me"), ("cell_images/Parasitized/a.png", PNG),
                                                   ("cell_images/Uninfected/b.png", PNG)])  # fmt: skip
    assert run(archive, work) == [(loose, "outside_class_folders")]
    assert tree(work) == {"Parasitized/a.png": PNG, "Uninfected/b.png": PNG}


def test_loose_file_above_a_deeper_class_tree_does_not_make_its_top_folder_the_class(tmp_path, work):
    archive = make_zip(tmp_path / "in" / "a.zip", [("flowers/LICENSE.txt", b"CC-BY"),
                                                   ("flowers/images/daisy/1.png", PNG),
                                                   ("flowers/images/rose/2.png", PNG)])  # fmt: skip
    assert run(archive, work) == [("flowers/LICENSE.txt", "outside_class_folders")]
    assert tree(work) == {"daisy/1.png": PNG, "rose/2.png": PNG}


def test_loose_file_beside_the_class_folders_at_the_root_is_skipped(tmp_path, work):
    archive = make_zip(tmp_path / "in" / "a.zip", [("cat/1.png", PNG), ("dog/2.png", PNG), ("notes.png", PNG)])
    assert run(archive, work) == [("notes.png", "outside_class_folders")]
    assert tree(work) == {"cat/1.png": PNG, "dog/2.png": PNG}


def test_second_copy_of_the_class_tree_is_skipped_as_nested_copy(tmp_path, work):
    archive = make_zip(tmp_path / "in" / "a.zip", [
        ("Parasitized/a.png", PNG), ("Uninfected/b.png", PNG),
        ("cell_images/Parasitized/a.png", PNG), ("cell_images/Uninfected/b.png", PNG),
    ])  # fmt: skip
    skipped = run(archive, work)
    assert sorted(skipped) == [("cell_images/Parasitized/a.png", "nested_copy"),
                               ("cell_images/Uninfected/b.png", "nested_copy")]  # fmt: skip
    assert tree(work) == {"Parasitized/a.png": PNG, "Uninfected/b.png": PNG}


def test_train_test_layout_keeps_its_split_folders_and_skips_its_nested_copy(tmp_path, work):
    # The Kaggle chest X-ray archive: chest_xray/{train,val,test}/<class>/, plus chest_xray/chest_xray/ again.
    layout = [f"{split}/{label}/1.png" for split in ("train", "val", "test") for label in ("NORMAL", "PNEUMONIA")]
    archive = make_zip(tmp_path / "in" / "a.zip", [(f"chest_xray/{rel}", PNG) for rel in layout]
                       + [(f"chest_xray/chest_xray/{rel}", PNG) for rel in layout])  # fmt: skip
    assert sorted(run(archive, work)) == sorted((f"chest_xray/chest_xray/{rel}", "nested_copy") for rel in layout)
    assert tree(work) == {rel: PNG for rel in layout}


@pytest.mark.parametrize("entries", [[], [("README.txt", b"hi"), ("cell_images/.DS_Store", b"junk")],
                                     [("a.png", PNG), ("b.png", PNG)]], ids=["empty", "junk_only", "flat"])
def test_archive_without_files_in_class_folders_stops_at_extract(tmp_path, work, entries):
    before = good_extraction(tmp_path, work)
    archive = make_zip(tmp_path / "in" / "nothing.zip", entries)
    with pytest.raises(ExtractError, match=r"nothing\.zip: no files inside class folders .*; nothing was kept$"):
        extract(params(), archive, work, tmp_path / "data" / "skipped.csv")
    assert tree(work) == before


# ---------------------------------------------------------------- formats


MIXED = [("cell_images/Parasitized/a.png", PNG), ("cell_images/Uninfected/b.png", PNG + b"b"),
         ("cell_images/.DS_Store", b"junk"), ("../evil.png", PNG)]  # fmt: skip


@pytest.mark.parametrize("mode", ["w:gz", "w", "w:bz2", "w:xz"])
def test_tar_gives_the_same_result_as_zip(tmp_path, mode):
    zip_out, tar_out = tmp_path / "z" / "extracted", tmp_path / "t" / "extracted"
    zip_skipped = run(make_zip(tmp_path / "in" / "a.zip", MIXED), zip_out)
    tar_skipped = run(make_tar(tmp_path / "in" / "a.tar", MIXED, mode=mode), tar_out)
    assert tree(tar_out) == tree(zip_out) == {"Parasitized/a.png": PNG, "Uninfected/b.png": PNG + b"b"}
    assert tar_skipped == zip_skipped == [("../evil.png", "path_traversal"), ("cell_images/.DS_Store", "os_junk")]


def test_archive_is_sniffed_by_content_not_extension(tmp_path, work):
    archive = make_tar(tmp_path / "in" / "really_a_tar.zip", [("cat/1.png", PNG), ("dog/2.png", PNG)])
    run(archive, work)
    assert tree(work) == {"cat/1.png": PNG, "dog/2.png": PNG}


def test_uncompressed_tar_whose_last_member_is_a_zip_is_extracted_as_tar(tmp_path, work):
    inner = make_zip(tmp_path / "in" / "inner.zip", [("inner/x.png", b"inner")])
    archive = make_tar(tmp_path / "in" / "a.tar", [("cat/1.png", PNG), ("dog/extra.zip", inner.read_bytes())], mode="w")
    run(archive, work)
    assert tree(work) == {"cat/1.png": PNG, "dog/extra.zip": inner.read_bytes()}


def test_file_that_is_neither_zip_nor_tar_raises_naming_it(tmp_path, work):
    archive = tmp_path / "in" / "cells.zip"
    archive.parent.mkdir()
    archive.write_bytes(b"<html>not an archive</html>\n" * 50)
    with pytest.raises(ExtractError, match="not a zip or tar") as raised:
        extract(params(), archive, work, tmp_path / "data" / "skipped.csv")
    assert str(archive) in str(raised.value)
    assert not work.exists()


def test_missing_archive_raises_extract_error(tmp_path, work):
    missing = tmp_path / "raw" / "cells.zip"
    with pytest.raises(ExtractError, match="no such archive"):
        extract(params(), missing, work, tmp_path / "data" / "skipped.csv")


def test_missing_archive_raises_and_writes_nothing(tmp_path, work):
    with pytest.raises((ExtractError, FileNotFoundError)):
        extract(params(), tmp_path / "raw" / "cells.zip", work, tmp_path / "data" / "skipped.csv")
    assert not work.exists()
    assert not (tmp_path / "data" / "skipped.csv").exists()


# ---------------------------------------------------------------- names, re-extraction


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_non_ascii_names_survive_extraction(tmp_path, work, kind):
    entries = [("Parasitized/세포_1.png", PNG), ("Uninfected/célula ñ.png", PNG + b"u")]
    archive = tmp_path / "in" / ("a.zip" if kind == "zip" else "a.tar.gz")
    (make_zip if kind == "zip" else make_tar)(archive, entries)
    run(archive, work)
    assert tree(work) == {"Parasitized/세포_1.png": PNG, "Uninfected/célula ñ.png": PNG + b"u"}


def test_re_extraction_replaces_old_content(tmp_path, work):
    run(make_zip(tmp_path / "in" / "old.zip", [("Parasitized/old.png", PNG), ("Gone/x.png", PNG)]), work)
    run(make_zip(tmp_path / "in" / "new.zip", [("Parasitized/new.png", PNG + b"n"), ("Uninfected/b.png", PNG)]), work)
    assert tree(work) == {"Parasitized/new.png": PNG + b"n", "Uninfected/b.png": PNG}
    assert temp_dirs_beside(work) == []


def test_a_zip_cut_short_is_named_truncated_not_corrupt(tmp_path, work):
    archive = make_zip(tmp_path / "in" / "a.zip", [("Parasitized/good.png", PNG), ("Uninfected/good.png", PNG + b"2")])
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(ExtractError, match=r"a.zip: truncated archive: a zip without its end .* nothing was kept"):
        run(archive, work)
    assert not work.exists()


def _damaged_directory(data: bytearray) -> None:
    data[data.index(b"PK\x01\x02") + 1] ^= 0xFF  # one central directory signature, the length unchanged


def _name_not_utf8(data: bytearray) -> None:
    data[:] = data.replace(b"Parasitized/aaaa.png", b"Parasitized/\xff\xfeaa.png")  # in both headers
    for signature, flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # set the UTF-8 flag in both headers
        data[data.index(signature) + flags + 1] |= 0x08


@pytest.mark.parametrize(("damage", "said"), [
    (_damaged_directory, r"corrupt archive \(BadZipFile: Bad magic number for central directory\)"),
    (_name_not_utf8, r"corrupt archive: an entry name marked UTF-8 is not UTF-8 \(b'Parasitized/\\xff\\xfeaa.png'\)"),
])  # fmt: skip
def test_a_whole_zip_damaged_inside_is_one_line_saying_corrupt_not_truncated(tmp_path, work, damage, said):
    archive = make_zip(tmp_path / "in" / "a.zip", [("Parasitized/aaaa.png", PNG), ("Uninfected/good.png", PNG + b"2")])
    data = bytearray(archive.read_bytes())
    damage(data)
    archive.write_bytes(bytes(data))
    with pytest.raises(ExtractError, match=rf"a.zip: {said}; nothing was kept"):
        run(archive, work)
    assert not work.exists()


def test_a_zip_cut_before_its_directory_is_not_read_as_the_zip_stored_inside_it(tmp_path, work):
    inner = make_zip(tmp_path / "in" / "inner.zip", [("q.txt", b"question")])
    archive = tmp_path / "in" / "outer.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as outer:
        outer.writestr("Parasitized/good.png", PNG)
        outer.writestr("Uninfected/good.png", PNG + b"2")
        outer.write(inner, "Uninfected/notes.zip")
    with zipfile.ZipFile(archive) as whole:
        directory = whole.start_dir
    archive.write_bytes(archive.read_bytes()[:directory])  # cut where the outer central directory starts
    with zipfile.ZipFile(archive) as found:  # what zipfile alone makes of it: the inner zip, and no error
        assert found.namelist() == ["q.txt"]
    from tasks.archives import completeness_problem  # download's check of a body without a length

    assert completeness_problem(archive) == "truncated archive: the last central directory is a stored zip's"
    with pytest.raises(ExtractError, match=r"outer.zip: truncated archive: its central directory is missing, and the "
                                           r"last one in the file is a zip stored inside it; nothing was kept"):  # fmt: skip
        run(archive, work)
    assert not work.exists()
