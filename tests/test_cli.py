"""The `genforge` command, end to end on a tiny model with a real tokenizer."""

import json

import pytest
import torch

from genforge.checkpoint import load_model, save_model
from genforge.cli import build_parser, main
from genforge.config import Config
from genforge.encoder import default_encoder_path
from genforge.generate.generator import generate
from genforge.generate.processors import SamplingParams
from genforge.inference import pack_for_cpu_inference
from genforge.model import Transformer
from genforge.tokenizer import Tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama whose embedding table is padded past the tokenizer's 30522 tokens."""
    tokenizer = Tokenizer.from_dir(default_encoder_path())
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Config(family="llama", vocab_size=30592, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, max_position_embeddings=256, eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():  # make the padded rows the most likely tokens: they must still never come out
        model.lm_head.weight[tokenizer.vocab_size:] = model.lm_head.weight[:64].sum(0) * 50
    return save_model(model, tmp_path_factory.mktemp("tiny") / "model", tokenizer=tokenizer)


def test_generate_streams_the_library_result(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "the cache", "--max-new-tokens", "12",
                 "--seed", "3", "--top-k", "50"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    tokenizer = Tokenizer.from_dir(model_dir)
    expected = generate(pack_for_cpu_inference(load_model(model_dir)), [tokenizer.encode("the cache")],
                        SamplingParams(max_new_tokens=12, seed=3, top_k=50), tokenizer=tokenizer)[0]
    assert printed == expected.text
    assert all(t < tokenizer.vocab_size for t in expected.token_ids)


def test_generate_batch_prints_json_lines(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "a", "--prompt", "b c",
                 "--max-new-tokens", "4", "--temperature", "0"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["a", "b c"]


def test_chat_renders_history_with_the_template(model_dir, capsys, monkeypatch):
    answers = iter(["hello there", "/reset", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", "--model", str(model_dir), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2


def test_convert_round_trips_and_changes_dtype(model_dir, tmp_path):
    assert main(["convert", "--model", str(model_dir), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "bf16" / "tokenizer.json").exists()
    original, converted = load_model(model_dir), load_model(tmp_path / "bf16", dtype="float32")
    for (name, a), (_, b) in zip(original.state_dict().items(), converted.state_dict().items()):
        torch.testing.assert_close(b, a.to(torch.bfloat16).float(), msg=name)


def test_bad_flags_give_a_clear_error_and_exit_code(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--logit-bias", "5"]) == 2
    assert "--logit-bias takes ID=BIAS" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir / "missing"), "--prompt", "x"]) == 2


def test_help_explains_each_command(capsys):
    parser = build_parser()
    for command in ("generate", "chat", "convert", "quickstart"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        assert "usage: genforge " + command in capsys.readouterr().out


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "timeit" in out  # "measure how long a snippet of code takes" finds the timeit module
    assert "logits identical" in out
    assert (tmp_path / "demo" / "model.safetensors").exists()
