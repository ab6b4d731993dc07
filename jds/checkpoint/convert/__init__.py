"""Checkpoint conversion between jds and other formats (Hugging Face, DeepSpeed)."""
