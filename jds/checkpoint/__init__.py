"""Checkpoints: Orbax training checkpoints, and conversion to/from Hugging Face and DeepSpeed."""

from jds.checkpoint.orbax import (
    CheckpointCorruptError,
    Checkpointer,
    verify_integrity,
    write_integrity,
)

__all__ = ["CheckpointCorruptError", "Checkpointer", "verify_integrity", "write_integrity"]
