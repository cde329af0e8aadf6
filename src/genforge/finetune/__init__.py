"""Fine-tuning methods that adapt a loaded model in place through the Linear seam
(`genforge.swap.swap_linears`). Now: LoRA, rsLoRA and DoRA (`lora`) and IA3 (`ia3`), in PEFT's
adapter format."""

from .ia3 import (
    IA3Config,
    IA3Error,
    IA3Linear,
    apply_ia3,
    ia3_peft_names,
    load_ia3_adapter,
    merge_ia3,
    save_ia3_adapter,
    unmerge_ia3,
)
from .lora import (
    DoraLinear,
    LoraConfig,
    LoraError,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    peft_names,
    save_adapter,
    trainable_parameter_count,
    unmerge_lora,
)

__all__ = [
    "DoraLinear",
    "IA3Config",
    "IA3Error",
    "IA3Linear",
    "apply_ia3",
    "ia3_peft_names",
    "load_ia3_adapter",
    "merge_ia3",
    "save_ia3_adapter",
    "unmerge_ia3",
    "LoraConfig",
    "LoraError",
    "LoraLinear",
    "apply_lora",
    "load_adapter",
    "lora_state_dict",
    "merge_and_unload",
    "merge_lora",
    "peft_names",
    "save_adapter",
    "trainable_parameter_count",
    "unmerge_lora",
]
