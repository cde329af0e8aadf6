"""Fine-tuning methods that adapt a loaded model in place through the Linear seam
(`genforge.swap.swap_linears`). Now: LoRA, rsLoRA and DoRA, in PEFT's adapter format (`lora`)."""

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
