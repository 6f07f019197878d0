"""Content fingerprints of project files and folders: what the flow's task cache keys on.

As DVC does, a file's hash is remembered with its size and modification time, so an
unchanged file is not read again; the memo lives in `.imgclf/hashes.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from tasks.files import atomic_file, sha256_file


class Fingerprints:
    def __init__(self, root: Path):
        self.root = root
        self.memo_path = root / ".imgclf" / "hashes.json"
        try:
            self.memo: dict[str, list] = json.loads(self.memo_path.read_text())
        except (OSError, ValueError):
            self.memo = {}
        self.seen: set[str] = set()

    def of(self, relative: str) -> str:
        """Returns the sha256 of a file, of a folder's (relative path, file hash) list, or 'missing'."""
        path = self.root / relative
        if path.is_file():
            return self._file(path)
        if not path.is_dir():
            return "missing"
        digest = hashlib.sha256()
        for directory, subdirs, files in os.walk(path):
            subdirs.sort()
            for name in sorted(files):
                full = Path(directory) / name
                digest.update(f"{full.relative_to(path).as_posix()}\0{self._file(full)}\n".encode())
        return digest.hexdigest()

    def _file(self, path: Path) -> str:
        stat = path.stat()
        key = str(path.relative_to(self.root))
        self.seen.add(key)
        known = self.memo.get(key)
        if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
            return known[2]
        digest = sha256_file(path)
        self.memo[key] = [stat.st_size, stat.st_mtime_ns, digest]
        return digest

    def save(self) -> None:
        """Keeps the memo of the files looked at in this run (others may be gone)."""
        with atomic_file(self.memo_path) as handle:
            json.dump({key: self.memo[key] for key in sorted(self.seen)}, handle)
