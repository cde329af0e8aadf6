"""genforge.quantize.saved, methods and `genforge quantize`: a quantized model saved and loaded
back computes the same logits (NF4, and a layer kind defined here), the decoding commands run
it as it is, and bad directories or requests are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from factories import tiny_model
from finetune_shared import tiny_chat_model_dir
from safetensors.torch import load_file, save_file
from torch import nn

from genforge.checkpoint import CheckpointError, load_model, save_model
from genforge.cli import main
from genforge.evaluate.perplexity import perplexity
from genforge.generate.generator import generate
from genforge.generate.sampling import SamplingParams
from genforge.inference import PackedLinear, can_pack, pack_for_cpu_inference
from genforge.loading import load_for_inference
from genforge.quantize import methods as quantize_methods
from genforge.quantize.cli import calibration_token_rows
from genforge.quantize.grid import Int8Grid, dequantize_int8, quantize_int8
from genforge.quantize.methods import QuantizeMethod, QuantizeOptions, quantize_model
from genforge.quantize.nf4 import NF4Error, NF4Linear, quantize_linears_nf4, quantize_nf4
from genforge.quantize.saved import (
    LAYER_KINDS,
    QuantizedCheckpointError,
    is_quantized,
    load_quantized,
    register_layer_kind,
    save_quantized,
)
from genforge.swap import swap_linears
from genforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[5, 17, 3, 44, 9, 12, 8, 61, 33, 2], [7, 7, 21, 40, 2, 45, 19, 56, 4, 30]])


class ShiftedRowInt8Linear(nn.Module):
    """A test-only layer kind: INT8 codes per output row (quantize.grid) and a `shift` setting
    added to every output, so that a setting lost between save and load changes the logits."""

    kind = "test-rows8"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, shift: float) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("weight", codes)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.shift = shift

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, shift: float = 0.0):
        codes = torch.zeros(out_features, in_features, dtype=torch.int8)
        return cls(codes, torch.zeros(out_features), torch.zeros(out_features) if bias else None, shift)

    @classmethod
    def from_linear(cls, linear: nn.Linear, shift: float = 0.0):
        grid = quantize_int8(linear.weight)
        return cls(grid.codes, grid.scale, linear.bias, shift)

    def settings(self) -> dict:
        return {"shift": self.shift}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize_int8(Int8Grid(self.weight, self.weight_scale)), self.bias) + self.shift


@pytest.fixture
def test_kind():
    register_layer_kind(ShiftedRowInt8Linear)
    yield ShiftedRowInt8Linear
    LAYER_KINDS.pop(ShiftedRowInt8Linear.kind)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _nf4_model(**overrides):
    model = tiny_model(**overrides).eval()
    quantize_linears_nf4(model)
    return model


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("tied", [False, True])
def test_nf4_round_trip_gives_identical_logits(tmp_path, tied):
    model = _nf4_model(tie_word_embeddings=tied)
    save_quantized(model, tmp_path / "q", method="nf4", details={"note": "test"})
    loaded = load_quantized(tmp_path / "q")
    assert torch.equal(_logits(loaded), _logits(model))
    assert isinstance(loaded.blocks[1].mlp.down, NF4Linear) and isinstance(loaded.lm_head, nn.Linear)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor) and loaded.state_dict()[name].dtype == tensor.dtype, name
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert block["method"] == "nf4" and block["details"] == {"note": "test"}
    assert block["layers"]["blocks.0.attn.qkv"] == {
        "kind": "nf4",
        "blocksize": 64,
        "double_quant": True,
        "double_blocksize": 256,
        "dtype": "float32",
    }
    assert set(block["layers"]) == {
        f"blocks.{i}.{n}" for i in (0, 1) for n in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")
    }
    saved = load_file(tmp_path / "q" / "model.safetensors")
    assert ("lm_head.weight" in saved) != tied  # a tied fp head is written once, as the embeddings
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    assert is_quantized(tmp_path / "q")
    save_quantized(loaded, tmp_path / "again", method="nf4")  # a loaded model saves again, the same
    assert load_file(tmp_path / "again" / "model.safetensors").keys() == saved.keys()
    assert torch.equal(_logits(load_quantized(tmp_path / "again")), _logits(model))


def test_nf4_settings_survive_the_round_trip(tmp_path):
    model = tiny_model().eval()
    quantize_linears_nf4(model, include=["qkv"], blocksize=128, double_quant=False)
    quantize_linears_nf4(model, include=["down"], blocksize=32)
    save_quantized(model, tmp_path / "q", method="nf4")
    loaded = load_quantized(tmp_path / "q")
    assert loaded.blocks[0].attn.qkv.settings() == model.blocks[0].attn.qkv.settings()
    assert loaded.blocks[0].attn.qkv.weight_nested_absmax is None and loaded.blocks[0].mlp.down.blocksize == 32
    assert isinstance(loaded.blocks[0].attn.o, nn.Linear)  # not quantized, loaded as fp
    assert torch.equal(_logits(loaded), _logits(model))


def test_test_kind_round_trip_including_a_tied_head(tmp_path, test_kind):
    model = tiny_model(tie_word_embeddings=True, mlp_bias=True).eval()
    embeddings = model.embed_tokens.weight.detach().clone()
    swap_linears(model, lambda linear, name: test_kind.from_linear(linear, shift=0.25), include=["down", "lm_head"])
    assert model.blocks[0].mlp.down.bias is not None
    save_quantized(model, tmp_path / "q", method="test")
    loaded = load_quantized(tmp_path / "q")
    assert isinstance(loaded.lm_head, test_kind) and loaded.lm_head.shift == 0.25
    assert torch.equal(loaded.embed_tokens.weight, embeddings)  # the quantized head left the embeddings fp
    assert torch.equal(_logits(loaded), _logits(model))


def test_nf4_empty_is_shaped_as_quantize_nf4_makes_it():
    weight = torch.randn(96, 128)
    for blocksize, double_quant in ((64, True), (128, False), (32, True)):
        full = NF4Linear(quantize_nf4(weight, blocksize, double_quant), torch.randn(96))
        empty = NF4Linear.empty(128, 96, True, **full.settings())
        assert empty.settings() == full.settings()
        shapes = {k: (v.shape, v.dtype) for k, v in empty.state_dict().items()}
        assert shapes == {k: (v.shape, v.dtype) for k, v in full.state_dict().items()}
    with pytest.raises(NF4Error, match="not a \\(non-zero\\) multiple of blocksize 64"):
        NF4Linear.empty(10, 3, False)
    with pytest.raises(NF4Error, match="dtype must be one of"):
        NF4Linear.empty(128, 96, False, dtype="int8")


def test_registering_layer_kinds(test_kind):
    assert register_layer_kind(test_kind) is test_kind  # again: nothing changes
    other = type("Other", (test_kind,), {})
    with pytest.raises(ValueError, match="already registered by ShiftedRowInt8Linear"):
        register_layer_kind(other)
    with pytest.raises(TypeError, match="class attribute `kind`"):
        register_layer_kind(nn.Linear)
    assert LAYER_KINDS["nf4"] is NF4Linear


# --------------------------------------------------------------------------- bad inputs
@pytest.fixture
def saved_nf4(tmp_path):
    model = _nf4_model()
    return save_quantized(model, tmp_path / "q", method="nf4")


def _edit_tensors(directory, change):
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_unknown_kind_lists_the_known_ones(saved_nf4):
    config = json.loads((saved_nf4 / "config.json").read_text())
    config["quantization_config"]["layers"]["blocks.0.attn.o"]["kind"] = "int3"
    (saved_nf4 / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizedCheckpointError, match="blocks.0.attn.o is of kind 'int3'.*known kinds: .*nf4"):
        load_quantized(saved_nf4)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda t: t.update({"blocks.0.attn.o.weight": t["blocks.0.attn.o.weight"][:-2]}), "has shape \\(510,\\)"),
        (lambda t: t.update({"final_norm.weight": torch.ones(7)}), "final_norm.weight has shape \\(7,\\)"),
        (lambda t: t.update({"blocks.0.attn.o.weight": t["blocks.0.attn.o.weight"].to(torch.int8)}), "dtype"),
        (lambda t: t.pop("blocks.1.mlp.down.weight_absmax"), "lacks 1 tensor.*blocks.1.mlp.down.weight_absmax"),
        (lambda t: t.update({"blocks.0.extra": torch.ones(2)}), "does not place: blocks.0.extra"),
    ],
)
def test_tampered_tensors_are_refused(saved_nf4, change, words):
    _edit_tensors(saved_nf4, change)
    with pytest.raises(QuantizedCheckpointError, match=words):
        load_quantized(saved_nf4)


def test_fp_loader_and_quantized_loader_refuse_each_others_directories(saved_nf4, tmp_path):
    with pytest.raises(CheckpointError, match="quantized by `genforge quantize` \\(method 'nf4'\\).*load_quantized"):
        load_model(saved_nf4)
    fp = save_model(tiny_model(), tmp_path / "fp")
    assert not is_quantized(fp) and not is_quantized(tmp_path / "absent")
    with pytest.raises(QuantizedCheckpointError, match="holds no genforge-quantized model"):
        load_quantized(fp)


def test_unsaveable_models_are_refused(tmp_path, test_kind):
    packed = pack_for_cpu_inference(_nf4_model())
    if getattr(packed, "packed_for_inference", False):
        with pytest.raises(QuantizedCheckpointError, match="packed for CPU inference"):
            save_quantized(packed, tmp_path / "packed", method="nf4")
    unregistered = type("Unregistered", (test_kind,), {"kind": "test-unregistered"})
    model = tiny_model().eval()
    swap_linears(model, lambda linear, name: unregistered.from_linear(linear), include=["o"])
    with pytest.raises(QuantizedCheckpointError, match="not a registered layer kind"):
        save_quantized(model, tmp_path / "unregistered", method="x")
    assert not (tmp_path / "packed").exists() and not (tmp_path / "unregistered").exists()


def test_a_floating_point_model_saved_from_a_quantized_config_does_not_claim_to_be_quantized(saved_nf4, tmp_path):
    loaded = load_quantized(saved_nf4)
    model = tiny_model()
    model.config.hf_extra.update(json.loads((saved_nf4 / "config.json").read_text()))
    save_model(model, tmp_path / "fp")
    assert "quantization_config" not in json.loads((tmp_path / "fp" / "config.json").read_text())
    assert "quantization_config" not in loaded.config.hf_extra


# ------------------------------------------------------------------------ inference path
def test_packing_leaves_quantized_layers_and_packs_the_rest(chat_dirs):
    _, quantized_dir = chat_dirs
    unpacked = load_quantized(quantized_dir)
    model = load_for_inference(quantized_dir).model
    assert isinstance(model.blocks[0].attn.qkv, NF4Linear) and isinstance(model.blocks[1].mlp.down, NF4Linear)
    if can_pack(unpacked):
        assert isinstance(model.lm_head, PackedLinear)
    torch.testing.assert_close(_logits(model, IDS % 256), _logits(unpacked, IDS % 256), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- methods
def test_quantize_model_reports_sizes_and_refuses_a_second_pass():
    model = tiny_model().eval()
    seen = []
    summary = quantize_model(model, "nf4", options=QuantizeOptions(progress=seen.append))
    assert summary["layers_quantized"] == 8 == len(seen) and summary["kinds"] == {"nf4": 8}
    assert summary["bytes_after"] < summary["bytes_before"]
    assert 4.0 < summary["bits_per_weight"] < 4.2  # codes plus double-quantized absmax
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "nf4")
    with pytest.raises(ValueError, match="unknown quantization method 'nf5'; accepted: int8, int4, gptq, awq, nf4"):
        quantize_model(tiny_model(), "nf5")
    fresh = tiny_model()
    with pytest.raises(ValueError, match="blocks.0.attn.qkv: blocksize must be one of"):
        quantize_model(fresh, "nf4", options=QuantizeOptions(group_size=48))
    assert not any(isinstance(m, NF4Linear) for m in fresh.modules())  # checked before any change


# -------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory):
    """A tiny chat model with a BPE tokenizer, and `genforge quantize --method nf4` of it."""
    root = tmp_path_factory.mktemp("quantize-cli")
    model_dir = tiny_chat_model_dir(root / "model")
    assert main(["quantize", "--model", str(model_dir), "--method", "nf4", "--out", str(root / "nf4")]) == 0
    return model_dir, root / "nf4"


def test_cli_quantize_equals_the_library(chat_dirs, capsys):
    model_dir, quantized_dir = chat_dirs
    library = load_model(model_dir)
    quantize_linears_nf4(library)
    loaded = load_quantized(quantized_dir)
    assert loaded.state_dict().keys() == library.state_dict().keys()
    for name, tensor in library.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert (quantized_dir / "tokenizer.json").exists() and (quantized_dir / "generation_config.json").exists()
    details = json.loads((quantized_dir / "config.json").read_text())["quantization_config"]["details"]
    assert details["layers_quantized"] == 8 and details["details"] == {"blocksize": 64, "double_quant": True}


def test_cli_prints_the_summary_as_json(chat_dirs, tmp_path, capsys):
    model_dir, _ = chat_dirs
    argv = ["quantize", "--model", str(model_dir), "--method", "nf4", "--out", str(tmp_path / "q")]
    assert main(argv + ["--group-size", "32", "--exclude", "lm_head", "down"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(tmp_path / "q") and summary["layers_quantized"] == 6
    assert summary["details"]["blocksize"] == 32
    assert summary["bytes_before"] / summary["bytes_after"] == pytest.approx(summary["compression"], rel=1e-3)


def test_generate_and_eval_ppl_run_the_quantized_model(chat_dirs, tmp_path, capsys):
    _, quantized_dir = chat_dirs
    argv = ["generate", "--model", str(quantized_dir), "--prompt", "What is two", "--max-new-tokens", "8"]
    assert main(argv + ["--temperature", "0"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    tokenizer = Tokenizer.from_dir(quantized_dir)
    model = pack_for_cpu_inference(load_quantized(quantized_dir))
    expected = generate(
        model, [tokenizer.encode("What is two")], SamplingParams(temperature=0, max_new_tokens=8), tokenizer=tokenizer
    )[0]
    assert printed == expected.text

    text = "What is two plus three? It is five. Name the colour of the sky. Blue. " * 6
    (tmp_path / "text.txt").write_text(text)
    argv = ["eval", "ppl", "--model", str(quantized_dir), "--text", str(tmp_path / "text.txt"), "--max-length", "32"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    ids = tokenizer.encode(text)
    library = perplexity(model, ids, max_length=32)
    assert result["perplexity"] == pytest.approx(library.perplexity, rel=1e-4)


def test_serve_loads_the_quantized_model(chat_dirs):
    from genforge.serve.api import app_from_directories

    _, quantized_dir = chat_dirs
    app = app_from_directories({"tiny": quantized_dir})
    served = app.state.server.engine.engine("tiny").model
    assert isinstance(served.blocks[0].attn.qkv, NF4Linear)


def _one_line_error(capsys, argv, words):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and err.count("\n") == 1, err


def test_cli_bad_inputs_are_one_line(chat_dirs, tmp_path, capsys):
    model_dir, quantized_dir = chat_dirs
    (tmp_path / "data.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    quantize = ["quantize", "--model", model_dir, "--method", "nf4", "--out", tmp_path / "out"]
    _one_line_error(capsys, quantize + ["--bits", "8"], "nf4 stores 4 bits per weight")
    _one_line_error(capsys, quantize + ["--group-size", "48"], "blocksize must be one of")
    _one_line_error(capsys, quantize + ["--include", "nothing"], "no linear layer matches 'nothing'")
    _one_line_error(
        capsys,
        ["quantize", "--model", quantized_dir, "--method", "nf4", "--out", tmp_path / "out"],
        "quantized by `genforge quantize`",
    )
    assert not (tmp_path / "out").exists()
    for method in ("full", "lora"):
        finetune = ["finetune", "--model", quantized_dir, "--data", tmp_path / "data.jsonl", "--method", method]
        _one_line_error(
            capsys,
            finetune + ["--out", tmp_path / "ft"],
            "Fine-tune the floating-point model and quantize after, or use --method qlora",
        )
    pretrain = ["pretrain", "--model", quantized_dir, "--text", tmp_path / "data.jsonl", "--init-weights"]
    _one_line_error(
        capsys,
        pretrain + ["--out", tmp_path / "pt", "--steps", "1"],
        "Train the floating-point model and quantize after",
    )
    generate_argv = ["generate", "--model", quantized_dir, "--prompt", "x"]
    _one_line_error(capsys, generate_argv + ["--dtype", "bfloat16"], "computes in float32")
    _one_line_error(capsys, generate_argv + ["--adapter", tmp_path], "an adapter is merged into floating-point weights")


def test_cli_refuses_a_tampered_directory(chat_dirs, tmp_path, capsys):
    import shutil

    _, quantized_dir = chat_dirs
    broken = shutil.copytree(quantized_dir, tmp_path / "broken")
    _edit_tensors(broken, lambda t: t.update({"blocks.0.mlp.down.weight": t["blocks.0.mlp.down.weight"][:8]}))
    _one_line_error(capsys, ["generate", "--model", broken, "--prompt", "x"], "blocks.0.mlp.down.weight has shape (8,)")
    config = json.loads((quantized_dir / "config.json").read_text())
    config["quantization_config"]["layers"]["blocks.0.attn.o"]["kind"] = "int3"
    unknown = shutil.copytree(quantized_dir, tmp_path / "unknown")
    (unknown / "config.json").write_text(json.dumps(config))
    _one_line_error(
        capsys,
        ["eval", "ppl", "--model", unknown, "--text", unknown / "config.json"],
        "which this genforge does not know; known kinds:",
    )


# ------------------------------------------------------------------------ calibration
def test_calibration_rows_and_a_text_too_short(chat_dirs, tmp_path, monkeypatch, capsys):
    model_dir, _ = chat_dirs
    tokenizer = Tokenizer.from_dir(model_dir)
    (tmp_path / "short.txt").write_text("def add(a, b):\n    return a + b\n")
    with pytest.raises(ValueError, match="give a longer --calibration file, or lower --samples or --sequence-length"):
        calibration_token_rows(tokenizer, str(tmp_path / "short.txt"), 4, 16)
    rows = calibration_token_rows(tokenizer, None, 3, 16)  # the standard library's source
    assert [tuple(r.shape) for r in rows] == [(1, 16)] * 3 and rows[0].dtype == torch.long

    received = []

    def calibrated(model, calibration, options):
        received.extend(calibration)
        return quantize_methods.METHODS["nf4"].quantize(model, None, options)

    monkeypatch.setitem(quantize_methods.METHODS, "test-calibrated", QuantizeMethod(calibrated, True, "test"))
    argv = ["quantize", "--model", model_dir, "--method", "test-calibrated", "--out", tmp_path / "q"]
    short = ["--calibration", tmp_path / "short.txt", "--seq-len", "16"]
    _one_line_error(capsys, argv + short, "fewer than --samples 128 x --sequence-length 16")
    (tmp_path / "long.txt").write_text("What is two plus three? It is five. " * 40)
    assert (
        main([str(a) for a in argv + ["--calibration", tmp_path / "long.txt", "--samples", "5", "--seq-len", "8"]]) == 0
    )
    assert len(received) == 5 and all(tuple(r.shape) == (1, 8) for r in received)
    summary = json.loads(capsys.readouterr().out)
    assert summary["details"]["calibration"]["samples"] == 5


@pytest.mark.parametrize("method", sorted(quantize_methods.METHODS))
def test_every_method_saves_loads_and_stays_close_to_the_fp_model(chat_dirs, tmp_path, method):
    """Each method of `genforge quantize`, on calibration rows where it reads them: the saved
    model loads back to the same logits, and those stay close to the floating-point model's."""
    model_dir, _ = chat_dirs
    fp = load_model(model_dir)
    tokenizer = Tokenizer.from_dir(model_dir)
    calibration = calibration_token_rows(tokenizer, None, 4, 32)
    model = load_model(model_dir)
    # INT4's group size must divide a layer's inputs: 32 does the tiny model's 32 features, not
    # the 48 that mlp.down reads, so that layer stays in fp.
    int4 = method in ("int4", "gptq", "awq")
    options = QuantizeOptions(group_size=32, exclude=("lm_head", "down")) if int4 else QuantizeOptions()
    summary = quantize_model(model, method, calibration, options)
    # int8 quantizes the LM head too by default (its kernel runs it faster); the others keep it fp.
    assert (
        summary["layers_quantized"] == (6 if int4 else 9 if method == "int8" else 8)
        and summary["bytes_after"] < summary["bytes_before"]
    )
    save_quantized(model, tmp_path / method, tokenizer, method=method, details=summary)
    loaded = load_quantized(tmp_path / method)
    ids = IDS % 256
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=0)
    similarity = F.cosine_similarity(_logits(loaded, ids).flatten(), _logits(fp, ids).flatten(), dim=0)
    assert similarity > 0.98, similarity
