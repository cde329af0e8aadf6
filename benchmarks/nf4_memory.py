"""Memory of an NF4 base (QLoRA) against fp32: the bytes of every parameter and buffer of the
linear layers `quantize_linears_nf4` replaces (all but lm_head), and of the whole model, before
and after, on random Llama-layout models: the tests' tiny one and a small one with SmolLM-135M's
shapes (576 wide, 30 layers, tied embeddings). Bytes are counted, not measured from the process,
so the numbers do not depend on the machine.

    PYTHONPATH=src python benchmarks/nf4_memory.py
"""

import torch

from genforge.config import Config
from genforge.finetune import LoraConfig, apply_lora, trainable_parameter_count
from genforge.model import Transformer
from genforge.quantize import quantize_linears_nf4
from genforge.swap import linear_names

MODELS = {
    "tiny": dict(
        family="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=48, max_position_embeddings=64,
    ),
    "small (SmolLM-135M shapes)": dict(
        family="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
        intermediate_size=1536, max_position_embeddings=2048, tie_word_embeddings=True,
    ),
}  # fmt: skip


def nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def main() -> None:
    mib = 2**20
    for label, fields in MODELS.items():
        torch.manual_seed(0)
        model = Transformer(Config(**fields))
        names = linear_names(model, exclude=("lm_head",))
        weights = sum(model.get_submodule(n).in_features * model.get_submodule(n).out_features for n in names)
        fp32_layers, fp32_model = sum(nbytes(model.get_submodule(n)) for n in names), nbytes(model)
        quantize_linears_nf4(model)
        nf4_layers, nf4_model = sum(nbytes(model.get_submodule(n)) for n in names), nbytes(model)
        apply_lora(model, LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=8, lora_alpha=16))
        trainable, _ = trainable_parameter_count(model)
        print(
            f"{label}: linear layers {fp32_layers / mib:.2f} MiB fp32 -> {nf4_layers / mib:.2f} MiB NF4 "
            f"({fp32_layers / nf4_layers:.2f}x smaller, {8 * nf4_layers / weights:.3f} bits per weight); "
            f"whole model {fp32_model / mib:.2f} -> {nf4_model / mib:.2f} MiB; "
            f"LoRA r=8 on q, k, v, o: {trainable} fp32 parameters ({4 * trainable / mib:.2f} MiB)"
        )


if __name__ == "__main__":
    main()
