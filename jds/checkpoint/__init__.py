"""Checkpoints: Orbax training checkpoints (and, later, conversion to/from HF and DeepSpeed)."""

from jds.checkpoint.orbax import Checkpointer

__all__ = ["Checkpointer"]
