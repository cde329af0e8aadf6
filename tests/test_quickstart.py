"""The quickstart's pretraining step (genforge.quickstart.pretrain_from_scratch) in its fast
mode: the standard-library sample goes through tokenizer training, data preparation and the
Trainer, the model ends below the unigram baseline on the same tokens, and the exported model
loads in transformers."""

from __future__ import annotations

import math

import pytest
import torch
from rich.console import Console

from genforge.quickstart import stdlib_source_files, unigram_cross_entropy


def test_stdlib_sample_is_deterministic_and_bounded():
    first, second = stdlib_source_files(300_000), stdlib_source_files(300_000)
    assert first == second and first == sorted(first)
    sizes = [p.stat().st_size for p in first]
    assert 300_000 <= sum(sizes) <= 300_000 + max(sizes)
    assert not any(part in ("test", "tests", "site-packages") for p in first for part in p.parts)
    assert set(stdlib_source_files(100_000)) < set(first)  # a smaller budget takes a prefix of the same order


def test_unigram_cross_entropy_by_hand():
    counts = torch.tensor([3, 1, 0])  # add-one: probabilities 4/7, 2/7, 1/7
    targets = torch.tensor([[0, 1], [2, 0]])
    expected = -(2 * math.log(4 / 7) + math.log(2 / 7) + math.log(1 / 7)) / 4
    assert unigram_cross_entropy(counts, targets) == pytest.approx(expected)


@pytest.mark.slow
def test_fast_pretraining_beats_the_unigram_baseline(tmp_path):
    from transformers import AutoModelForCausalLM

    from genforge.checkpoint import load_model
    from genforge.quickstart import pretrain_from_scratch

    console = Console(record=True, width=160, force_terminal=False)
    numbers = pretrain_from_scratch(tmp_path, console, fast=True)
    text = console.export_text()
    assert numbers["val_loss"] < numbers["unigram_loss"] - 0.1, numbers
    assert f"{numbers['unigram_loss']:.3f}" in text and f"{numbers['val_loss']:.3f}" in text
    for setting in ("greedy", "top-p", "contrastive search"):
        assert setting in text
    assert set(numbers["samples"]) == {"greedy", "top-p 0.9, temperature 0.8", "contrastive search (alpha 0.6, k 4)"}
    assert numbers["loss_curve"].is_file() and numbers["loss_curve"].stat().st_size > 1000
    meta = numbers["meta"]
    assert meta["documents"]["kept"] > 0 and meta["splits"]["val"]["tokens"] > 0
    # The exported model is a Hugging Face directory with the same logits in transformers.
    reference = AutoModelForCausalLM.from_pretrained(numbers["model_dir"]).eval()
    ours = load_model(numbers["model_dir"]).eval()
    probe = torch.randint(0, ours.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.allclose(reference(probe).logits, ours(probe).logits, atol=1e-4)

    # Step 4 on the model just trained: LoRA on the docstring task, scored before and after.
    from genforge.quickstart import finetune_with_lora

    tuned = finetune_with_lora(tmp_path, console, numbers["model_dir"], fast=True)
    assert tuned["val_loss_after"] < tuned["val_loss_before"], tuned
    assert 0.0 <= tuned["exact_match_before"] <= 1.0 and 0.0 <= tuned["exact_match_after"] <= 1.0
    assert (tuned["adapter_dir"] / "adapter_config.json").is_file()
    assert f"{tuned['val_loss_after']:.3f}" in console.export_text()
