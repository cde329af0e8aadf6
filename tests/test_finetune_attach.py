"""genforge.finetune.attach and `--adapter`: an adapter directory of any mergeable kind folded
into the loaded model, for decoding with the adapter at the base model's speed."""

from __future__ import annotations

import json

import pytest
import torch
from finetune_shared import randomize, tiny_chat_model_dir

from genforge.checkpoint import load_model
from genforge.finetune import IA3Config, LoraConfig, apply_ia3, apply_lora, save_adapter, save_ia3_adapter
from genforge.finetune.attach import AdapterError, adapter_kind, merge_adapter_dir
from genforge.loading import load_for_inference

PROBE = torch.tensor([[3, 9, 27, 81, 14, 5]])


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_chat_model_dir(tmp_path_factory.mktemp("base"))


def _logits(model):
    with torch.no_grad():
        return model.eval()(PROBE).logits


def _lora_dir(base_dir, directory):
    adapted = apply_lora(load_model(base_dir), LoraConfig(target_modules=["qkv", "down"], r=4))
    randomize(adapted.named_parameters())
    save_adapter(adapted, directory)
    return _logits(adapted)


def _ia3_dir(base_dir, directory):
    adapted = apply_ia3(load_model(base_dir), IA3Config(target_modules=["qkv", "down"], feedforward_modules=["down"]))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "ia3_l" in name:
                parameter.uniform_(0.5, 1.5)
    save_ia3_adapter(adapted, directory)
    return _logits(adapted)


@pytest.mark.parametrize("make", [_lora_dir, _ia3_dir], ids=["lora", "ia3"])
def test_merged_adapter_gives_the_adapted_logits_with_plain_linear_layers(make, base_dir, tmp_path):
    expected = make(base_dir, tmp_path / "adapter")
    merged = merge_adapter_dir(load_model(base_dir), tmp_path / "adapter")
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=0)
    assert all(type(module).__name__ == "Linear" for name, module in merged.named_modules() if name.endswith("qkv"))
    loaded = load_for_inference(base_dir, adapter=tmp_path / "adapter")  # packed for the CPU as well
    torch.testing.assert_close(_logits(loaded.model), expected, atol=1e-4, rtol=0)


def test_generate_cli_decodes_with_the_adapter(base_dir, tmp_path, capsys):
    from genforge.cli import main
    from genforge.generate.generator import generate
    from genforge.generate.sampling import SamplingParams

    _lora_dir(base_dir, tmp_path / "adapter")
    argv = ["generate", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter")]
    assert main(argv + ["--prompt", "What is", "--prompt", "Name", "--temperature", "0", "--max-new-tokens", "5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    loaded = load_for_inference(base_dir, adapter=tmp_path / "adapter")
    prompts = [loaded.tokenizer.encode(p) for p in ("What is", "Name")]
    expected = generate(loaded.model, prompts, SamplingParams(temperature=0, max_new_tokens=5), loaded.tokenizer)
    assert [line["completion"] for line in lines] == [c.text for c in expected]


def test_unmergeable_or_missing_adapters_are_refused(base_dir, tmp_path):
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        adapter_kind(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING"}))
    with pytest.raises(AdapterError, match="PROMPT_TUNING adapter, which does not merge"):
        merge_adapter_dir(load_model(base_dir), tmp_path)
