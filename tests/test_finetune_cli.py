"""`genforge merge-models` and `merge-adapter`: each writes what its library function writes,
and a user's mistake is one line on stderr with exit status 2, never a traceback."""

import peft
import pytest
import reference_models
import torch
from factories import tiny_model
from finetune_shared import TOKENS, randomize

from genforge.checkpoint import load_model, save_model
from genforge.cli import main
from genforge.finetune import IA3Config, apply_ia3, save_ia3_adapter
from genforge.finetune.merge import MergeConfig, merge_lora_adapters, merge_models

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny base, two models moved away from it, and a model of another shape, saved."""
    root = tmp_path_factory.mktemp("cli-merge")
    base = tiny_model().eval()
    save_model(base, root / "base")
    for seed in (1, 2):
        model = tiny_model(seed).eval()
        save_model(model, root / f"model{seed}")
    save_model(tiny_model(intermediate_size=64), root / "other-shape")
    return root


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A tiny transformers Llama saved, with two PEFT LoRA adapters and an IA3 adapter for it."""
    root = tmp_path_factory.mktemp("cli-adapters")
    reference_models.build("llama").save_pretrained(root / "base")
    for index, lora in enumerate(
        [dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), dict(r=2, target_modules=["o_proj"])]
    ):
        model = peft.get_peft_model(reference_models.build("llama"), peft.LoraConfig(**lora))
        randomize(model.named_parameters(), seed=index + 1)
        model.save_pretrained(root / f"lora{index}")
    ia3 = apply_ia3(load_model(root / "base"), IA3Config(["k_proj", "down_proj"]))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, parameter in ia3.named_parameters():
            if "ia3_l" in name:
                parameter.uniform_(0.5, 1.5)
    save_ia3_adapter(ia3, root / "ia3")
    return root, ia3


def run(capsys, *argv):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.err


def test_merge_models_writes_the_library_merge(checkpoints, tmp_path, capsys):
    status, err = run(
        capsys,
        "merge-models",
        "--method",
        "dare_ties",
        "--base",
        checkpoints / "base",
        "--models",
        checkpoints / "model1",
        checkpoints / "model2",
        "--weights",
        "1",
        "0.5",
        "--density",
        "0.4",
        "--seed",
        "9",
        "--out",
        tmp_path / "merged",
    )
    assert status == 0, err
    assert "merged 2 models by dare_ties, weights 1, 0.5, density 0.4" in err
    expected = merge_models(
        [load_model(checkpoints / "model1"), load_model(checkpoints / "model2")],
        MergeConfig("dare_ties", weights=(1, 0.5), density=0.4, seed=9),
        load_model(checkpoints / "base"),
    )
    written = load_model(tmp_path / "merged")
    for (name, got), want in zip(written.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(got, want), name


def test_slerp_from_the_command_line(checkpoints, tmp_path, capsys):
    models = [checkpoints / "model1", checkpoints / "model2"]
    status, err = run(
        capsys, "merge-models", "--method", "slerp", "--models", *models, "--t", "0.25", "--out", tmp_path / "s"
    )
    assert status == 0, err
    expected = merge_models([load_model(m) for m in models], MergeConfig("slerp", t=0.25))
    written = load_model(tmp_path / "s")
    assert all(torch.equal(a, b) for a, b in zip(written.parameters(), expected.parameters(), strict=True))


def test_merge_adapter_writes_a_plain_checkpoint_with_the_adapted_logits(adapters, tmp_path, capsys):
    root, ia3 = adapters
    # One LoRA adapter: merged exactly; PEFT's own merge gives the same logits.
    status, err = run(
        capsys, "merge-adapter", "--model", root / "base", "--adapter", root / "lora0", "--out", tmp_path / "m"
    )
    assert status == 0, err
    reference = peft.PeftModel.from_pretrained(reference_models.build("llama"), root / "lora0").merge_and_unload()
    with torch.no_grad():
        assert (load_model(tmp_path / "m")(TOKENS).logits - reference(TOKENS).logits).abs().max() < 1e-4
    # One IA3 adapter: the merged checkpoint computes what the adapted model computes.
    status, err = run(
        capsys, "merge-adapter", "--model", root / "base", "--adapter", root / "ia3", "--out", tmp_path / "i"
    )
    assert status == 0, err
    with torch.no_grad():
        assert (load_model(tmp_path / "i")(TOKENS).logits - ia3(TOKENS).logits).abs().max() < 1e-4
    # Two LoRA adapters with weights: their delta weights added into the base.
    status, err = run(
        capsys,
        "merge-adapter",
        "--model",
        root / "base",
        "--adapter",
        root / "lora0",
        root / "lora1",
        "--weights",
        "0.5",
        "2",
        "--out",
        tmp_path / "two",
    )
    assert status == 0, err
    expected = merge_lora_adapters(
        load_model(root / "base"), [root / "lora0", root / "lora1"], MergeConfig("task_arithmetic", weights=(0.5, 2))
    )
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "two")(TOKENS).logits, expected(TOKENS).logits)


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--method", "soup", "--models", "model1", "model2"], "unknown merge method 'soup'; accepted: linear"),
        (["--method", "linear", "--models", "model1", "model2", "--weights", "1"], "1 weight(s) for 2 model(s)"),
        (["--method", "linear", "--models", "model1", "other-shape"], "the models differ in architecture"),
        (["--method", "ties", "--base", "base", "--models", "model1", "model2"], "ties needs a density"),
        (["--method", "task_arithmetic", "--models", "model1"], "it needs the base model"),
        (["--method", "slerp", "--models", "model1", "model2", "base"], "exactly two models; got 3"),
        (["--method", "linear", "--models", "model1", "model2", "--t", "0.3"], "linear takes no t"),
        (["--method", "linear", "--models", "model1", "missing"], "missing is not a directory"),
        (["--method", "linear", "--models", "model1", "model2", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    ],
)
def test_bad_merge_models_input_is_one_line(argv, words, checkpoints, tmp_path, capsys):
    named = [str(checkpoints / a) if a in ("model1", "model2", "base", "other-shape", "missing") else a for a in argv]
    status, err = run(capsys, "merge-models", *named, "--out", tmp_path / "out")
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert words in err
    assert not (tmp_path / "out").exists()


def test_different_shapes_are_named_with_both(checkpoints, tmp_path, capsys):
    status, err = run(
        capsys,
        "merge-models",
        "--method",
        "linear",
        "--models",
        checkpoints / "model1",
        checkpoints / "other-shape",
        "--out",
        tmp_path / "out",
    )
    assert status == 2
    assert "intermediate_size 48 in" in err and "but 64 in" in err and str(checkpoints / "other-shape") in err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--adapter", "lora0", "ia3"], "IA3 adapters merge one at a time"),
        (["--adapter", "lora0", "lora1", "--weights", "1"], "1 weight(s) for 2 adapter(s)"),
        (["--adapter", "lora0", "--method", "slerp"], "slerp interpolates two whole models"),
        (["--adapter", "lora0", "lora1", "--method", "ties"], "ties needs a density"),
        (["--adapter", "base"], "has no adapter_config.json"),
    ],
)
def test_bad_merge_adapter_input_is_one_line(extra, words, adapters, tmp_path, capsys):
    root, _ = adapters
    named = [str(root / a) if a in ("lora0", "lora1", "ia3", "base") else a for a in extra]
    status, err = run(capsys, "merge-adapter", "--model", root / "base", *named, "--out", tmp_path / "out")
    assert status == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert words in err
    assert not (tmp_path / "out").exists()
