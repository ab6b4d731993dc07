"""LoRA and QLoRA fine-tuning for any NNX model; Hugging Face PEFT adapters in and out.

    import jds
    model = jds.models.build("llama-tiny")
    jds.lora.apply(model, r=16, alpha=32, target_modules=["q_proj", "v_proj"])
    engine = jds.initialize(model, config)        # trains the adapters only
    jds.lora.save_peft(engine.model, "adapter/")  # a folder peft.PeftModel loads

Or from the config: a ``lora`` section (``jds.config.LoRAConfig``) makes the engine apply
it. See ``jds.lora.core`` for the layout and ``jds.lora.peft`` for the file format.
"""

from jds.lora.core import INITS, QUANTIZE_BASE, adapter_targets, apply, merge, parse_lora_flag
from jds.lora.peft import load_peft, save_peft
from jds.models.adapters import LoRALinear, LoRASpec, is_adapted

__all__ = ["INITS", "QUANTIZE_BASE", "LoRALinear", "LoRASpec", "adapter_targets", "apply",
           "is_adapted", "load_peft", "merge", "parse_lora_flag", "save_peft"]
