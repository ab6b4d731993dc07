"""Inference: ``jds.init_inference`` (tensor-parallel, paged KV cache, int8 weights,
continuous batching with Dynamic SplitFuse)."""

from jds.inference.engine import InferenceConfig, InferenceEngine, init_inference
from jds.inference.kv_cache import BlockAllocator, CacheFullError, paged_attention_reference
from jds.inference.scheduler import Request, Scheduler

__all__ = [
    "BlockAllocator",
    "CacheFullError",
    "InferenceConfig",
    "InferenceEngine",
    "Request",
    "Scheduler",
    "init_inference",
    "paged_attention_reference",
]
