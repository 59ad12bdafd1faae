"""Atomic file output: a result file is either complete or absent, never half-written.

This is the one place in influencekit that writes files: figures, results, caches. A write goes to
a new temporary file in the destination folder, is flushed and fsynced, then renamed over the
destination (``os.replace``, atomic on POSIX and Windows), and the folder is fsynced so that the
rename itself survives a crash. The temporary file is created with mode 0o666 filtered by the
process umask, exactly like a plain ``open(path, "w")`` (``tempfile.mkstemp`` would make every
output private, mode 0o600).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Any


def _create_temporary(folder: Path, name: str) -> tuple[int, Path]:
    """A new, exclusively created file next to the destination: (descriptor, path)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        temporary = folder / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file for {name} in {folder}")


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = _create_temporary(path.parent, path.name)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, payload: Any) -> Path:
    """Atomically write ``payload`` as indented, standard JSON.

    NaN and infinities have no JSON spelling; they are refused (ValueError) rather than written
    as the non-standard ``NaN``. Callers that may hold them write ``None`` (null) instead.
    """
    text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False)
    return atomic_write_text(path, text + "\n")
