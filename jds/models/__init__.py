"""Models: Llama-family and GPT-2 in Flax NNX, presets, Hugging Face loading, sampling.

Every parameter is an ``nnx.Param`` carrying logical ``axes`` metadata
(``jds.partitioning.axes``); decoder layers are stacked on a leading ``layers`` axis and
scanned. ``llama_block`` / ``gpt2_block`` are the plain per-layer functions that ZeRO-3 and
pipeline stages reuse.

    import jds.models as M
    model = M.build("llama-tiny")                 # or M.from_pretrained("path/to/hf_dir")
    logits_BTV = model(input_ids_BT)
    new_ids = M.generate(model, [72, 105], 32, temperature=0.8, top_k=40)
"""

from jds.models.gpt2 import GPT2, GPT2Config, gpt2_block
from jds.models.hf import config_from_hf, from_pretrained
from jds.models.layers import REMAT_MODES
from jds.models.llama import Llama, LlamaConfig, RopeScaling, llama_block
from jds.models.registry import PRESETS, build, get_config, model_class
from jds.models.sampling import generate

__all__ = [
    "GPT2",
    "PRESETS",
    "REMAT_MODES",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "RopeScaling",
    "build",
    "config_from_hf",
    "from_pretrained",
    "generate",
    "get_config",
    "gpt2_block",
    "llama_block",
    "model_class",
]
