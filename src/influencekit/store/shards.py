"""A folder of array shards that a job fills one at a time and a killed job resumes.

Layout::

    folder/manifest.json          what the store is for: format, settings, fingerprints (written
                                  once, when the job starts; a later job must match it)
    folder/<name>.npy             one shard, a NumPy array (memory-mappable, no pickle)
    folder/<name>.done.json       its commit record: SHA-256 and size of the .npy, and what it
                                  holds (which rows or columns)

Under torch.distributed, process 0 creates the manifest (and removes a killed job's temporary
files) before the others open it; each shard is written by the one process that owns it.

A shard counts as finished only when its commit record exists and the .npy has the recorded
SHA-256. Both files are written by :mod:`influencekit.io`'s atomic writer, the record after the
shard, so a job killed at any point (even while writing a shard) leaves finished shards and at
most some temporary files, which the next job removes. Records are separate files rather than
entries of one manifest, so that several processes (ranks of a distributed job) can commit
their own shards of one store without sharing a file.

``.npy`` rather than safetensors: a reader memory-maps any shard with ``numpy.load(...,
mmap_mode="r")`` and slices rows or columns without reading the rest, the format is a
published, stable part of NumPy, and it holds exactly one array with its shape and dtype in a
plain-text header.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from .. import distributed
from ..errors import CacheMismatchError
from ..io import atomic_write_bytes, atomic_write_json

MANIFEST = "manifest.json"


class ShardFolder:
    """A store folder: its manifest and its committed shards.

    Args:
        folder: where the store lives (created if absent).
        header: what the store is for (JSON-able). A new folder gets it as its manifest; an
            existing one must have been made with the same header, else
            :class:`~influencekit.errors.CacheMismatchError` names the fields that differ.
        create: write the manifest if the folder has none (``False``: only open).
    """

    def __init__(self, folder: str | Path, header: dict[str, Any] | None = None,
                 create: bool = True) -> None:
        self.folder = Path(folder)
        first = distributed.rank() == 0  # creates the manifest and clears leftovers, then the
        distributed.together(lambda: self._open(header, create, True) if first else None)
        distributed.together(lambda: None if first else self._open(header, False, False))

    def _open(self, header: dict[str, Any] | None, create: bool, clean: bool) -> None:
        path = self.folder / MANIFEST
        if path.exists():
            self.manifest = json.loads(path.read_text())
            if header is not None:
                self._check(header)
        elif header is not None and create:
            atomic_write_json(path, header)
            self.manifest = json.loads(path.read_text())
        else:
            raise CacheMismatchError(f"{self.folder} holds no store ({MANIFEST} is missing).")
        if clean:
            for leftover in self.folder.glob(".*.tmp"):  # a killed job's half-written files
                leftover.unlink(missing_ok=True)

    def _check(self, header: dict[str, Any]) -> None:
        expected = json.loads(json.dumps(header))  # the same normalisation as on disk
        differing = sorted(key for key in set(expected) | set(self.manifest)
                           if expected.get(key) != self.manifest.get(key))
        if differing:
            shown = "; ".join(f"{key}: store {_short(self.manifest.get(key))} vs now "
                              f"{_short(expected.get(key))}" for key in differing)
            raise CacheMismatchError(
                f"The store {self.folder} was made with other settings ({shown}). Use another "
                "folder, or delete this one to start over; stores are never mixed.")

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"{name}.npy", self.folder / f"{name}.done.json"

    def record(self, name: str) -> dict[str, Any] | None:
        """The commit record of a finished shard, or ``None`` if it is not finished."""
        array_path, record_path = self._paths(name)
        if not (record_path.exists() and array_path.exists()):
            return None
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            return None
        if array_path.stat().st_size != record.get("bytes"):
            return None
        if _sha256(array_path.read_bytes()) != record.get("sha256"):
            return None
        return record

    def write(self, name: str, array: np.ndarray, **info: Any) -> dict[str, Any]:
        """Write the shard, then its commit record; returns the record."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
        payload = buffer.getvalue()
        array_path, record_path = self._paths(name)
        atomic_write_bytes(array_path, payload)
        record = {"sha256": _sha256(payload), "bytes": len(payload),
                  "shape": list(array.shape), "dtype": str(array.dtype), **info}
        atomic_write_json(record_path, record)
        return record

    def read(self, name: str) -> np.ndarray:
        """A finished shard, memory-mapped (read-only)."""
        return np.load(self._paths(name)[0], mmap_mode="r", allow_pickle=False)

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        """A small JSON record in the store (e.g. the summary of a finished job)."""
        atomic_write_json(self.folder / f"{name}.json", payload)

    def read_json(self, name: str) -> dict[str, Any] | None:
        path = self.folder / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def _short(value: Any, limit: int = 100) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."
