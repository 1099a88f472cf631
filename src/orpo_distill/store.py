"""Append-only JSONL stores with stable keys, and atomic whole-file writes.

Teacher traces cost money and time, so a store never loses a line that was flushed and never holds
a key twice. Appends are flushed and fsynced per batch. A process killed in the middle of a write
can leave at most one torn last line; opening the store cuts it off (that sample is then generated
again). Every line records the settings hash it was made with: reopening a store with different
settings is refused rather than silently mixing old traces into a new run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import UserError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename, so readers never see half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # a read-only or full file system: name the file we meant, not the temp name
        raise OSError(e.errno, e.strerror, str(path)) from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not e.filename:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy through a temp file and a rename: a kill mid-copy leaves no half file for a store to trust."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def iter_jsonl(path: Path, what: str = "file") -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file:line", object)`` for each non-blank line of a JSONL file.

    Lines are decoded one by one, so a bad byte or bad JSON is a :class:`UserError` naming its line;
    a byte-order mark on the first line is accepted. ``what`` names the file in the not-found error.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))  # without the line end, so a column past it reads right
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """The objects of a JSONL file (see :func:`iter_jsonl` for the errors)."""
    for _, obj in iter_jsonl(path):
        yield obj


def settings_hash(obj: Any) -> str:
    """A short stable hash of anything JSON-serialisable (prompt template and sampling settings)."""
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _repair_torn_tail(path: Path) -> int:
    """Cut a last line that lacks its newline (a write killed midway). Returns bytes removed."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # find the last newline; everything after it is the torn line
        pos = size - 1
        chunk = 4096
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            idx = buf.rfind(b"\n")
            if idx >= 0:
                cut = start + idx + 1
                break
            pos = start
        else:
            cut = 0
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
        return size - cut


def free_name(path: Path) -> Path:
    """``path``, or ``path.1``, ``path.2``, ... : the first that does not exist (set-aside traces are
    never overwritten: they may have cost money)."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _complete_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a store another process may be appending to: a last line without its newline is
    skipped, not read (a reader must not repair another process's file)."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    for line in data[:end].decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


class TraceStore:
    """One JSONL file of generated samples keyed by ``(id, sample)``.

    ``settings`` is the hash of what produced the samples; opening a store whose lines carry another
    hash raises :class:`UserError` unless ``overwrite`` is set, in which case the old file is kept
    aside as ``NAME.jsonl.old`` (``.old.1``, ... if that exists) and a fresh one begins.

    ``writer=False`` (the non-main ranks of a multi-process run) reads the file but never changes it:
    appended rows are kept in memory only, and the main process's copy of them is on disk.
    """

    def __init__(self, path: Path, settings: str, overwrite: bool = False, writer: bool = True):
        self.path = Path(path)
        self.settings = settings
        self.writer = writer
        self.rows: dict[tuple[str, int], dict[str, Any]] = {}
        if writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if writer:
                _repair_torn_tail(self.path)
            rows = list(_complete_lines(self.path)) if not writer else list(read_jsonl(self.path))
            other = {r.get("settings") for r in rows} - {settings}
            if other and not (overwrite and writer):
                raise UserError(
                    f"{self.path} was generated with other settings (hash {sorted(map(str, other))[0]}, "
                    f"now {settings}): the prompt, model or sampling settings changed. Use a new run_dir, "
                    "or pass --overwrite to set the old file aside and generate again."
                )
            if other:
                os.replace(self.path, free_name(self.path.with_suffix(".jsonl.old")))
                rows = []
            for r in rows:
                self.rows.setdefault((str(r["id"]), int(r["sample"])), r)

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def count(self, qid: str) -> int:
        """How many samples of question ``qid`` are stored (indices 0..count-1 are assumed dense)."""
        n = 0
        while (qid, n) in self.rows:
            n += 1
        return n

    def for_question(self, qid: str) -> list[dict[str, Any]]:
        return [self.rows[(qid, i)] for i in range(self.count(qid))]

    def append(self, rows: list[dict[str, Any]]) -> int:
        """Append new rows (skipping keys already present), flushed and fsynced. Returns rows written."""
        fresh = []
        for r in rows:
            key = (str(r["id"]), int(r["sample"]))
            if key in self.rows:
                continue
            r = {**r, "settings": self.settings}
            self.rows[key] = r
            fresh.append(r)
        if not fresh or not self.writer:
            return len(fresh)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in fresh).encode("utf-8")
        try:
            with self.path.open("ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a full disk: at most a torn last line is left, cut off when the store is reopened
            if e.filename:
                raise
            raise OSError(e.errno, e.strerror, str(self.path)) from e
        return len(fresh)

    def all_rows(self) -> list[dict[str, Any]]:
        return list(self.rows.values())
