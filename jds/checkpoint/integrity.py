"""Checkpoint integrity: a manifest of every file's size and CRC-32, written before a step
is committed and checked before it is restored (see ``jds.checkpoint.orbax``)."""

from __future__ import annotations

import json
import os
import zlib

INTEGRITY_FILE = "jds_integrity.json"
# Orbax rewrites these at commit time (after the manifest is written); their damage shows as
# a JSON error, which restore reports naming the file.
_UNTRACKED = frozenset({INTEGRITY_FILE, "_CHECKPOINT_METADATA", "commit_success.txt"})
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
_CHUNK = 16 * 1024 * 1024


class CheckpointCorruptError(ValueError):
    """A checkpoint step is damaged or incomplete (the message names the files)."""


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _tracked_files(step_dir: str) -> list[str]:
    out = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            if name in _UNTRACKED or name.endswith(".tmp"):
                continue
            out.append(os.path.relpath(os.path.join(root, name), step_dir))
    return sorted(out)


def write_integrity(step_dir: str | os.PathLike) -> None:
    """Write ``jds_integrity.json`` (size and CRC-32 of every file) into ``step_dir``.

    The manifest is written to a temporary file, fsynced and renamed, so it is never partial.
    """
    step_dir = os.fspath(step_dir)
    files = {rel: [os.path.getsize(os.path.join(step_dir, rel)),
                   _crc32(os.path.join(step_dir, rel))] for rel in _tracked_files(step_dir)}
    tmp = os.path.join(step_dir, INTEGRITY_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"format": 1, "algorithm": "crc32", "files": files}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, os.path.join(step_dir, INTEGRITY_FILE))


def verify_integrity(step_dir: str | os.PathLike) -> bool:
    """Check ``step_dir`` against its manifest.

    Returns:
      True if verified, False if the step has no manifest (nothing to check against).

    Raises:
      CheckpointCorruptError: a file is missing, has another size, or another checksum
        (every such file named).
    """
    step_dir = os.fspath(step_dir)
    manifest = os.path.join(step_dir, INTEGRITY_FILE)
    if not os.path.isfile(manifest):
        return False
    try:
        with open(manifest, encoding="utf-8") as fh:
            files = json.load(fh)["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointCorruptError(f"{manifest} is damaged ({e})") from e
    problems = []
    for rel, (size, crc) in sorted(files.items()):
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            problems.append(f"{path}: missing")
            continue
        actual = os.path.getsize(path)
        if actual != size:
            problems.append(f"{path}: {actual} bytes, {size} when saved (truncated or damaged)")
        elif _crc32(path) != crc:
            problems.append(f"{path}: contents changed since saving (CRC-32 mismatch)")
    if problems:
        raise CheckpointCorruptError(
            f"checkpoint {step_dir} is damaged ({len(problems)} files):\n  "
            + "\n  ".join(problems)
        )
    return True


__all__ = ["INTEGRITY_FILE", "CheckpointCorruptError", "verify_integrity", "write_integrity"]
