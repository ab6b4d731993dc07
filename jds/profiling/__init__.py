"""Profiling: analytic FLOPs per token, device peak FLOP/s, MFU."""

from jds.profiling.flops import device_peak_flops, mfu, train_flops_per_token

__all__ = ["device_peak_flops", "mfu", "train_flops_per_token"]
