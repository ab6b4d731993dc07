"""Damaged checkpoint steps: found without restoring, and moved aside so they never block.

A step is *damaged* when a file fails its integrity manifest (missing, truncated, changed:
``verify_integrity``) or when a metadata file the restore needs does not parse (Orbax's
``_CHECKPOINT_METADATA``, the array tree's ``state/_METADATA``, jds's ``meta/metadata``
with the config and the data loader's position). A step without a manifest is
*unverified*: restored, with a warning.

When a restore falls back past a damaged step, the step folder is moved to
``<checkpoints>/damaged/<step>-<YYYYmmdd-HHMMSS>/`` — never deleted — so the run can save
that step number again (Orbax refuses to overwrite an existing step), and a person can
still look at what was there. Orbax lists only numeric folders as steps, so ``damaged/`` is
invisible to it. ``jds checkpoints verify DIR`` prints ``scan``'s verdict per step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Literal

import jax

from jds.checkpoint.integrity import INTEGRITY_FILE, CheckpointCorruptError, verify_integrity

DAMAGED_DIR = "damaged"
# JSON files a restore parses; their damage shows as a parse error on every read.
_METADATA_FILES = ("_CHECKPOINT_METADATA", os.path.join("state", "_METADATA"),
                   os.path.join("meta", "metadata"))


@dataclasses.dataclass(frozen=True)
class StepStatus:
    """One step folder's verdict.

    Attributes:
      step: the step number.
      path: the step folder.
      status: ``"intact"`` (manifest verified), ``"unverified"`` (no manifest; metadata
        readable) or ``"damaged"``.
      detail: for a damaged step, what is wrong (each damaged file named); else ``""``.
    """

    step: int
    path: str
    status: Literal["intact", "unverified", "damaged"]
    detail: str = ""


def step_folders(directory: str | os.PathLike) -> dict[int, str]:
    """Every step folder under ``directory`` (numeric names), by step."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return {}
    return {int(name): os.path.join(directory, name) for name in os.listdir(directory)
            if name.isdigit() and os.path.isdir(os.path.join(directory, name))}


def check_step(step: int, step_dir: str) -> StepStatus:
    """Verify one step folder (manifest, then the metadata a restore parses)."""
    try:
        verified = verify_integrity(step_dir)
    except CheckpointCorruptError as e:
        return StepStatus(step, step_dir, "damaged", str(e))
    problems = []
    for rel in _METADATA_FILES:
        path = os.path.join(step_dir, rel)
        if not os.path.isfile(path):
            if rel != "_CHECKPOINT_METADATA":  # Orbax tolerates its own file's absence
                problems.append(f"{path}: missing")
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(f"{path}: not readable JSON ({e})")
    if problems:
        return StepStatus(step, step_dir, "damaged",
                          f"checkpoint {step_dir} is damaged ({len(problems)} files):\n  "
                          + "\n  ".join(problems))
    return StepStatus(step, step_dir, "intact" if verified else "unverified")


def scan(directory: str | os.PathLike) -> list[StepStatus]:
    """Every step under ``directory``, oldest first, checked without restoring."""
    return [check_step(s, d) for s, d in sorted(step_folders(directory).items())]


def checkpoint_root(path: str | os.PathLike) -> str:
    """The checkpoint folder of a ``jds train`` run folder, or ``path`` itself."""
    path = os.fspath(path)
    inner = os.path.join(path, "checkpoints")
    return inner if os.path.isdir(inner) and not step_folders(path) else path


def quarantine(directory: str | os.PathLike, step: int) -> str:
    """Move step ``step`` out of the way, to ``directory/damaged/<step>-<time>``.

    In a multi-process job the primary process moves it and every process waits for
    that, so all of them see the same steps afterwards.

    Returns:
      Where the step now lies.
    """
    directory = os.fspath(directory)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = os.path.join(directory, DAMAGED_DIR, f"{step}-{stamp}")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        n = 1
        while os.path.exists(target):  # twice in one second
            target = os.path.join(directory, DAMAGED_DIR, f"{step}-{stamp}.{n}")
            n += 1
        shutil.move(os.path.join(directory, str(step)), target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jds-quarantine-{step}")
    return target


def first_problem(message: str) -> str:
    """The first damaged file a damage message names (its first line otherwise)."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return lines[1] if len(lines) > 1 else lines[0] if lines else ""


__all__ = ["DAMAGED_DIR", "INTEGRITY_FILE", "StepStatus", "check_step", "checkpoint_root",
           "first_problem", "quarantine", "scan", "step_folders"]
