"""Profiling: the flops profiler (per-module FLOPs, MACs, parameters, latency), analytic
FLOPs per token, device peak FLOP/s, MFU."""

from jds.profiling.flops import device_peak_flops, mfu, train_flops_per_token
from jds.profiling.model_profile import ModelProfile, get_model_profile, profile_function

__all__ = ["ModelProfile", "device_peak_flops", "get_model_profile", "mfu", "profile_function",
           "train_flops_per_token"]
