"""load_for_inference: a model directory made ready to decode."""

import json

import pytest
import torch

import genforge.loading
from genforge.checkpoint import CheckpointError, load_model, save_model
from genforge.config import Config
from genforge.generate.decode import decode
from genforge.generate.sampling import SamplingParams
from genforge.loading import LoadedModel, load_for_inference, load_packed_model
from genforge.model import Transformer


@pytest.fixture(scope="module")
def model_dir(bpe_tokenizer, tmp_path_factory):
    config = Config(
        family="llama",
        vocab_size=448,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        eos_token_id=bpe_tokenizer.eos_token_id,
    )
    torch.manual_seed(1)
    directory = save_model(Transformer(config), tmp_path_factory.mktemp("loading") / "model", tokenizer=bpe_tokenizer)
    # An end-of-turn id that only generation_config.json lists, as Llama 3 instruct models have.
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9], "temperature": 0.6}))
    return directory


def test_loads_model_tokenizer_end_ids_and_generation_config(model_dir, bpe_tokenizer, monkeypatch):
    packed = []
    real_pack = genforge.loading.pack_for_cpu_inference
    monkeypatch.setattr(
        genforge.loading, "pack_for_cpu_inference", lambda model: packed.append(model) or real_pack(model)
    )
    loaded = load_for_inference(model_dir)
    assert isinstance(loaded, LoadedModel) and packed == [loaded.model]
    assert loaded.tokenizer.vocab_size == bpe_tokenizer.vocab_size
    assert loaded.eos_token_ids == tuple(sorted({bpe_tokenizer.eos_token_id, 7, 9}))
    assert loaded.generation_config == {"eos_token_id": [7, 9], "temperature": 0.6}
    ids = torch.tensor([bpe_tokenizer.encode("the parser")])
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(ids).logits, load_model(model_dir)(ids).logits, rtol=1e-4, atol=1e-4)
    # What a decode needs comes together.
    params = SamplingParams.from_generation_config(loaded.generation_config, max_new_tokens=5, seed=0)
    assert params.temperature == 0.6
    [done] = decode(
        "sample", loaded.model, loaded.tokenizer, ["the parser"], params, eos_token_ids=loaded.eos_token_ids
    )
    assert done.text is not None and len(done.token_ids) <= 5


def test_a_second_model_loads_packed_without_a_tokenizer(model_dir):
    model = load_packed_model(model_dir, dtype="float32")
    assert model.config.vocab_size == 448 and not model.training


def test_broken_small_files_fail_before_the_weights(model_dir, tmp_path, monkeypatch):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (model_dir / name).exists():
            (broken / name).write_text((model_dir / name).read_text())
    (broken / "generation_config.json").write_text("{not json")
    monkeypatch.setattr(genforge.loading, "load_model", lambda *a, **k: pytest.fail("loaded the weights"))
    with pytest.raises(CheckpointError, match="generation_config.json is not valid JSON"):
        load_for_inference(broken)
    (broken / "generation_config.json").unlink()
    (broken / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_for_inference(broken)


def test_sampling_params_follow_the_generation_config():
    config = {"temperature": 0.7, "top_p": 0.9, "do_sample": False, "top_k": None}
    assert SamplingParams.from_generation_config(config).temperature == 0.0  # do_sample false: greedy
    chosen = SamplingParams.from_generation_config(config, temperature=0.5, top_k=None, max_new_tokens=3)
    assert (chosen.temperature, chosen.top_p, chosen.top_k, chosen.max_new_tokens) == (0.5, 0.9, 0, 3)
    assert SamplingParams.from_generation_config({}) == SamplingParams()
