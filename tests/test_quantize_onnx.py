"""ONNX export, run by onnxruntime and checked against genforge's own forward passes.

Each exported graph is fed a prompt with empty past keys/values (the prefill), then one token
at a time with the presents it returned (decoding); its logits must equal genforge's on the
same inputs with a `ContiguousKVCache`, and its greedy tokens genforge's `generate`.
"""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import reference_models
import torch
from factories import tiny_model

from genforge.cache import ContiguousKVCache
from genforge.checkpoint import load_model
from genforge.cli import main
from genforge.generate.generator import generate
from genforge.generate.sampling import SamplingParams
from genforge.quantize.nf4 import quantize_linears_nf4
from genforge.quantize.onnx_export import ONNXExportError, export_onnx

TOLERANCE = 1e-4


def _session(path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray] | None):
    """One call of the graph; `past` None is the prefill (empty keys/values, read off the graph's
    own input shapes). Returns (logits, presents)."""
    feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64)}
    past_inputs = session.get_inputs()[2:]
    for i, graph_input in enumerate(past_inputs):
        _, kv_heads, _, head_dim = graph_input.shape
        empty = np.zeros((input_ids.shape[0], kv_heads, 0, head_dim), np.float32)
        feed[graph_input.name] = empty if past is None else past[i]
    logits, *presents = session.run(None, feed)
    return logits, presents


def _ort_greedy(session, prompt: list[int], new_tokens: int) -> list[int]:
    ids = np.array([prompt])
    logits, past = _run(session, ids, np.ones_like(ids), None)
    tokens = []
    for _ in range(new_tokens):
        tokens.append(int(logits[0, -1].argmax()))
        length = len(prompt) + len(tokens)
        logits, past = _run(session, np.array([[tokens[-1]]]), np.ones((1, length)), past)
    return tokens


def _save_reference(name: str, directory):
    reference_models.build(name).save_pretrained(directory)
    return directory


def _perturbed_tiny_model(**overrides):
    """tiny_model with norms and biases moved off 1 and 0, so that a misplaced one shows."""
    model = tiny_model(**overrides).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (genforge model, path of its graph): the Llama model exported from the object,
    GPT-2 from a Hugging Face directory through the CLI (whose report `test_cli` reads)."""
    out = tmp_path_factory.mktemp("onnx")
    llama = _perturbed_tiny_model()
    export_onnx(llama, out / "llama.onnx")
    gpt2_dir = _save_reference("gpt2", out / "gpt2")
    assert main(["export", "onnx", "--model", str(gpt2_dir), "--out", str(out / "gpt2.onnx")]) == 0
    return {"llama": (llama, out / "llama.onnx"), "gpt2": (load_model(gpt2_dir), out / "gpt2.onnx")}


def _check_prefill_and_decode(model, session, prompt_length: int = 9, steps: int = 4) -> None:
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (2, prompt_length), generator=torch.Generator().manual_seed(3))
    cache = ContiguousKVCache(model.config, 2, prompt_length + steps)
    with torch.inference_mode():
        expected = model(prompt, cache=cache).logits
    logits, past = _run(session, prompt.numpy(), np.ones(prompt.shape), None)
    np.testing.assert_allclose(logits, expected.numpy(), atol=TOLERANCE, rtol=0)
    assert [p.shape[2] for p in past] == [prompt_length] * len(past)
    for step in range(steps):
        token = torch.from_numpy(logits[:, -1].argmax(-1))[:, None]
        with torch.inference_mode():
            expected = model(token, cache=cache).logits
        length = prompt_length + step + 1
        logits, past = _run(session, token.numpy(), np.ones((2, length)), past)
        np.testing.assert_allclose(logits, expected.numpy(), atol=TOLERANCE, rtol=0)
        assert [p.shape[2] for p in past] == [length] * len(past)
    # The presents are the cache genforge keeps, position for position.
    np.testing.assert_allclose(past[0], cache.keys[0][:, :, : cache.length].numpy(), atol=TOLERANCE, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefill_and_decode_steps_match_genforge(exported, family):
    model, path = exported[family]
    _check_prefill_and_decode(model, _session(path))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_tokens_match_generate(exported, family):
    model, path = exported[family]
    prompt = torch.randint(0, model.config.vocab_size, (6,), generator=torch.Generator().manual_seed(4)).tolist()
    expected = generate(model, prompt, SamplingParams(temperature=0, max_new_tokens=12), eos_token_ids=[])
    assert _ort_greedy(_session(path), prompt, 12) == expected[0].token_ids


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_rows_get_their_own_logits(exported, family):
    """Positions come from the mask: a left-padded row's logits and next step are those of the
    row alone."""
    model, path = exported[family]
    session = _session(path)
    short, long = [5, 9, 14], [3, 1, 4, 1, 5, 9, 2]
    ids = np.array([[0] * (len(long) - len(short)) + short, long])
    mask = np.array([[0] * (len(long) - len(short)) + [1] * len(short), [1] * len(long)])
    logits, past = _run(session, ids, mask, None)
    step_logits, _ = _run(session, np.array([[7], [8]]), np.concatenate([mask, np.ones((2, 1))], axis=1), past)
    for row, prompt, new in ((0, short, 7), (1, long, 8)):
        with torch.inference_mode():
            alone = model(torch.tensor([prompt + [new]])).logits[0].numpy()
        np.testing.assert_allclose(logits[row, -len(prompt) :], alone[:-1], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(step_logits[row, 0], alone[-1], atol=TOLERANCE, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mistral", "qwen2-sliding", "qwen3", "gemma", "phi3"])
def test_other_families_match_genforge(tmp_path, name):
    """Sliding windows shorter than the prompt, q/k bias and norm, Gemma's scaled embeddings and
    offset norms and partial rotary all reach the graph."""
    directory = _save_reference(name, tmp_path / name)
    result = export_onnx(directory, tmp_path / "model.onnx")
    assert result.family == reference_models.FAMILIES[name][0].model_type
    _check_prefill_and_decode(load_model(directory), _session(result.path), prompt_length=8, steps=3)


@pytest.mark.slow
def test_last_logits_only_with_external_data(exported, tmp_path):
    model, path = exported["llama"]
    result = export_onnx(model, tmp_path / "last.onnx", last_logits_only=True, external_data=True)
    assert result.external_data == tmp_path / "last.onnx.data" and result.external_data.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.onnx", "last.onnx.data"]  # no staging left
    onnx.checker.check_model(str(result.path))
    ids = np.array([[1, 2, 3, 4, 5]])
    last, last_past = _run(_session(result.path), ids, np.ones_like(ids), None)
    full, full_past = _run(_session(path), ids, np.ones_like(ids), None)
    assert last.shape == (1, 1, model.config.vocab_size)
    np.testing.assert_allclose(last[:, 0], full[:, -1], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(last_past[-1], full_past[-1], atol=TOLERANCE, rtol=0)


@pytest.mark.slow
def test_cli_writes_a_graph_onnx_checker_accepts(exported):
    _, path = exported["gpt2"]
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path))
    inputs = [i.name for i in graph.graph.input]
    assert inputs == ["input_ids", "attention_mask"] + [
        f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")
    ]
    assert [o.name for o in graph.graph.output] == ["logits"] + [
        f"present.{i}.{kind}" for i in range(2) for kind in ("key", "value")
    ]
    metadata = {p.key: p.value for p in graph.metadata_props}
    assert metadata["genforge.family"] == "gpt2" and metadata["genforge.logits"] == "all"
    assert json.loads(metadata["genforge.config"])["num_layers"] == 2
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging directory left


def test_cli_report(tmp_path, capsys, monkeypatch):
    """The CLI prints what `export_onnx` returns (here a stand-in, so that no export runs)."""
    from genforge.quantize import onnx_export

    directory = tmp_path / "model"
    calls = []

    def fake_export(model, out, last_logits_only):
        calls.append((model, out, last_logits_only))
        return onnx_export.ONNXExport(
            path=tmp_path / "m.onnx",
            family="llama",
            num_layers=1,
            input_names=tuple(onnx_export.onnx_input_names(1)),
            output_names=tuple(onnx_export.onnx_output_names(1)),
            opset=20,
            num_bytes=123,
            external_data=None,
            last_logits_only=True,
        )

    monkeypatch.setattr(onnx_export, "export_onnx", fake_export)
    args = ["export", "onnx", "--model", str(directory), "--out", str(tmp_path / "m.onnx"), "--last-logits-only"]
    assert main(args) == 0
    assert calls == [(str(directory), str(tmp_path / "m.onnx"), True)]
    report = json.loads(capsys.readouterr().out)
    assert report["logits"] == "last" and report["bytes"] == 123 and report["external_data"] is None
    assert report["inputs"][2:] == ["past_key_values.0.key", "past_key_values.0.value"]


# ---------------------------------------------------------------------------------- errors
def _cli_error(capsys, model, out) -> str:
    capsys.readouterr()  # what building the model printed (transformers' progress bars)
    assert main(["export", "onnx", "--model", str(model), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    return err


def test_unsupported_family_is_refused_with_the_supported_ones(tmp_path, capsys):
    directory = _save_reference("mixtral", tmp_path / "mixtral")
    err = _cli_error(capsys, directory, tmp_path / "m.onnx")
    assert "'mixtral' family" in err and "supported: llama, mistral, qwen2, qwen3, gemma, phi3, gpt2" in err
    with pytest.raises(ONNXExportError, match="3 experts"):
        export_onnx(tiny_model(num_experts=3), tmp_path / "m.onnx")
    with pytest.raises(ONNXExportError, match="dynamic NTK"):
        export_onnx(tiny_model(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), tmp_path / "m.onnx")
    assert not any(tmp_path.glob("*.onnx*"))


def test_out_path_in_a_missing_directory_is_refused(tmp_path, capsys):
    directory = _save_reference("llama", tmp_path / "llama")
    err = _cli_error(capsys, directory, tmp_path / "missing" / "m.onnx")
    assert "does not exist" in err and str(tmp_path / "missing") in err
    with pytest.raises(ONNXExportError, match="is a directory"):
        export_onnx(tiny_model(), tmp_path)


def test_quantized_models_are_refused(tmp_path, capsys):
    directory = _save_reference("llama", tmp_path / "llama")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "genforge", "method": "int8", "layers": {}}
    (directory / "config.json").write_text(json.dumps(config))
    err = _cli_error(capsys, directory, tmp_path / "m.onnx")
    assert "quantized model (int8)" in err

    model = tiny_model().eval()
    quantize_linears_nf4(model)
    with pytest.raises(ONNXExportError, match="is a NF4Linear"):
        export_onnx(model, tmp_path / "m.onnx")
    with pytest.raises(ONNXExportError, match="float32 graph"):
        export_onnx(tiny_model().to(torch.bfloat16), tmp_path / "m.onnx")
    assert not any(tmp_path.glob("*.onnx*"))
