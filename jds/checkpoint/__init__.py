"""Checkpoints: Orbax training checkpoints, and conversion to/from Hugging Face and DeepSpeed."""

from jds.checkpoint.integrity import CheckpointCorruptError, verify_integrity, write_integrity
from jds.checkpoint.orbax import Checkpointer

__all__ = ["CheckpointCorruptError", "Checkpointer", "verify_integrity", "write_integrity"]
