"""Fine-tuning: adapt a loaded model to new data, and combine what fine-tuning made.

- `sft`: instruction/chat data to completion-only labels; `SFTRows` packs examples in rows.
- `run`: the fine-tuning run (`finetune`, `FinetuneConfig`) over the training loop, every method.
- PEFT methods, installed through the Linear seam (`genforge.swap.swap_linears`) or, for the
  prompt methods, around the model: `lora` (LoRA, rsLoRA, DoRA, QLoRA), `ia3`, `adapters`
  (BitFit, bottleneck adapters, AdapterFusion), `prompts` (prompt tuning, P-tuning, prefix
  tuning); PEFT's adapter format both ways.
- `attach`: any adapter directory put back on its base (merged where exact).
- `merge`: model soups, task arithmetic, TIES, DARE, SLERP; LoRA adapters combined.
- `continual`: replay and elastic weight consolidation against forgetting.
- `tasks`: an embedded instruction task (signature -> docstring summary) and exact match.
"""

from .adapters import (
    AdapterConfig,
    AdapterError,
    apply_adapter_fusion,
    apply_adapters,
    apply_bitfit,
    load_adapters,
    merge_adapters,
    save_adapters,
    set_active_adapter,
)
from .attach import adapter_kind, attach_adapter, merge_adapter_dir
from .continual import EWCPenalty, diagonal_fisher, load_ewc, save_ewc, with_replay
from .distill import teacher_answers
from .ia3 import (
    IA3Config,
    IA3Error,
    IA3Linear,
    apply_ia3,
    ia3_peft_names,
    load_ia3_adapter,
    merge_and_unload_ia3,
    merge_ia3,
    save_ia3_adapter,
    unmerge_ia3,
)
from .lora import (
    DoraLinear,
    LoraConfig,
    LoraError,
    LoraLinear,
    QLoraLinear,
    apply_lora,
    disabled_adapters,
    load_adapter,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    peft_names,
    save_adapter,
    trainable_parameter_count,
    unmerge_lora,
)
from .merge import MergeConfig, MergeError, combine_lora_adapters, merge_checkpoints, merge_state_dicts
from .multi_lora import MultiLora, UnknownAdapterError
from .prompts import (
    PrefixTuningConfig,
    PromptLearningError,
    PromptTuningConfig,
    PTuningConfig,
    apply_prompt_learning,
    load_prompt_adapter,
    save_prompt_adapter,
)
from .run import METHODS, FinetuneConfig, FinetuneError, FinetuneResult, finetune
from .sft import (
    IGNORE_INDEX,
    SFT_FORMATS,
    SFTDataError,
    SFTDataset,
    SFTExample,
    SFTRows,
    collate,
    detect_format,
    read_sft_records,
    record_to_conversation,
    tokenize_conversation,
    tokenize_prompt_completion,
)

__all__ = [
    "AdapterConfig",
    "AdapterError",
    "apply_adapter_fusion",
    "apply_adapters",
    "apply_bitfit",
    "load_adapters",
    "merge_adapters",
    "save_adapters",
    "set_active_adapter",
    "adapter_kind",
    "attach_adapter",
    "merge_adapter_dir",
    "EWCPenalty",
    "diagonal_fisher",
    "load_ewc",
    "save_ewc",
    "with_replay",
    "teacher_answers",
    "IA3Config",
    "IA3Error",
    "IA3Linear",
    "apply_ia3",
    "ia3_peft_names",
    "load_ia3_adapter",
    "merge_and_unload_ia3",
    "merge_ia3",
    "save_ia3_adapter",
    "unmerge_ia3",
    "DoraLinear",
    "LoraConfig",
    "LoraError",
    "LoraLinear",
    "QLoraLinear",
    "apply_lora",
    "disabled_adapters",
    "load_adapter",
    "lora_state_dict",
    "merge_and_unload",
    "merge_lora",
    "peft_names",
    "save_adapter",
    "trainable_parameter_count",
    "unmerge_lora",
    "MergeConfig",
    "MergeError",
    "combine_lora_adapters",
    "merge_checkpoints",
    "merge_state_dicts",
    "MultiLora",
    "UnknownAdapterError",
    "PTuningConfig",
    "PrefixTuningConfig",
    "PromptLearningError",
    "PromptTuningConfig",
    "apply_prompt_learning",
    "load_prompt_adapter",
    "save_prompt_adapter",
    "METHODS",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "finetune",
    "IGNORE_INDEX",
    "SFT_FORMATS",
    "SFTDataError",
    "SFTDataset",
    "SFTExample",
    "SFTRows",
    "collate",
    "detect_format",
    "read_sft_records",
    "record_to_conversation",
    "tokenize_conversation",
    "tokenize_prompt_completion",
]
