"""Model merging (genforge.finetune.merge): each method against PEFT's merge utilities on the
same tensors, SLERP against its formula, checkpoint directories merged end to end, and LoRA
adapters combined as PEFT's add_weighted_adapter combines them."""

import math

import peft
import pytest
import reference_models
import torch
from factories import tiny_model
from finetune_shared import TOKENS, randomize, saved_families
from peft.utils import merge_utils

from genforge.checkpoint import load_model, save_model
from genforge.finetune import LoraConfig, apply_lora, load_adapter, save_adapter
from genforge.finetune.merge import (
    MergeConfig,
    MergeError,
    combine_lora_adapters,
    dare_linear,
    dare_ties,
    disjoint_mean,
    linear,
    magnitude_prune,
    majority_sign_mask,
    merge_checkpoints,
    merge_lora_adapters,
    merge_models,
    merge_state_dicts,
    random_drop,
    slerp,
    task_arithmetic,
    ties,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def task_vectors(seed: int = 0, count: int = 3, shape=(12, 10)) -> list[torch.Tensor]:
    """Random task vectors whose signs disagree often, so the sign election matters."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


WEIGHTS = [0.7, -0.4, 1.3]


# ----------------------------------------------------------------------------- against PEFT
def test_magnitude_prune_keeps_what_peft_keeps():
    tensor = task_vectors()[0]
    for density in (0.1, 0.35, 0.5, 0.9):
        ours = magnitude_prune(tensor, density)
        assert torch.equal(ours, merge_utils.prune(tensor, density, method="magnitude"))
        assert int((ours != 0).sum()) == int(density * tensor.numel())


def test_majority_sign_and_disjoint_mean_equal_peft():
    stacked = torch.stack([magnitude_prune(t, 0.5) for t in task_vectors()])
    for method in ("total", "frequency"):
        mask = majority_sign_mask(stacked, method)
        expected = merge_utils.calculate_majority_sign_mask(stacked, method=method)
        assert torch.equal(mask, expected)
        assert torch.equal(disjoint_mean(stacked, mask), merge_utils.disjoint_merge(stacked, expected))
    # The two elections differ on these tensors, so each is checked for itself.
    assert not torch.equal(majority_sign_mask(stacked, "total"), majority_sign_mask(stacked, "frequency"))


@pytest.mark.filterwarnings("ignore:The density 1.0")  # PEFT's note that density 1 trims nothing
@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 0.7, 1.0])
def test_ties_equals_peft(density, majority_sign):
    vectors = task_vectors()
    weights = torch.tensor(WEIGHTS)
    expected = merge_utils.ties(vectors, weights, density, majority_sign)
    assert torch.equal(ties(vectors, WEIGHTS, density, majority_sign), expected)
    assert expected.abs().sum() > 0


def test_task_arithmetic_and_linear_equal_peft_and_the_formula():
    vectors = task_vectors()
    expected = merge_utils.task_arithmetic(vectors, torch.tensor(WEIGHTS))
    assert torch.equal(task_arithmetic(vectors, WEIGHTS), expected)
    assert torch.allclose(expected, sum(w * v for w, v in zip(WEIGHTS, vectors)), atol=1e-6)
    positive = [2.0, 1.0, 1.0]
    assert torch.allclose(linear(vectors, positive), (2 * vectors[0] + vectors[1] + vectors[2]) / 4, atol=1e-6)
    assert torch.allclose(linear(vectors), sum(vectors) / 3, atol=1e-6)  # a uniform soup


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
def test_dare_equals_peft_with_the_same_random_stream(majority_sign):
    vectors = task_vectors(seed=3)
    weights = torch.tensor(WEIGHTS)
    for density in (0.2, 0.6):
        torch.manual_seed(11)
        expected_linear = merge_utils.dare_linear(vectors, weights, density)
        torch.manual_seed(11)
        expected_ties = merge_utils.dare_ties(vectors, weights, density, majority_sign)
        ours_linear = dare_linear(vectors, WEIGHTS, density, torch.Generator().manual_seed(11))
        ours_ties = dare_ties(vectors, WEIGHTS, density, majority_sign, torch.Generator().manual_seed(11))
        assert torch.equal(ours_linear, expected_linear)
        assert torch.equal(ours_ties, expected_ties)


def test_dare_drops_about_one_minus_density_and_rescales_the_rest():
    tensor = torch.ones(200, 200)
    dropped = random_drop(tensor, 0.25, generator=torch.Generator().manual_seed(0))
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    assert torch.equal(dropped[kept], torch.full((int(kept.sum()),), 4.0))  # 1 / density
    torch.manual_seed(5)
    expected = merge_utils.prune(tensor, 0.25, method="random", rescale=True)
    assert torch.equal(random_drop(tensor, 0.25, generator=torch.Generator().manual_seed(5)), expected)


# ----------------------------------------------------------------------------- SLERP
def test_slerp_endpoints_and_midpoint_norm():
    a, b = torch.randn(7, 5, generator=torch.Generator().manual_seed(1)), torch.randn(7, 5)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    unit_a, unit_b = a / a.norm(), b / b.norm()
    for t in (0.25, 0.5, 0.8):
        assert abs(slerp(unit_a, unit_b, t).norm().item() - 1) < 1e-5  # stays on the sphere
    assert slerp(unit_a, unit_b, 0.5).norm() > ((unit_a + unit_b) / 2).norm()  # unlike the chord


def test_slerp_of_orthogonal_vectors_follows_the_quarter_circle():
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])
    for t in (0.1, 0.5, 0.9):
        expected = math.cos(t * math.pi / 2) * a + math.sin(t * math.pi / 2) * b
        assert torch.allclose(slerp(a, b, t), expected, atol=1e-6)


def test_slerp_matches_the_formula_at_a_general_angle():
    a, b = torch.tensor([1.0, 2.0, -0.5, 0.3]), torch.tensor([-0.4, 1.5, 2.0, 1.0])
    angle = math.acos((a @ b / (a.norm() * b.norm())).item())
    t = 0.3
    expected = (math.sin((1 - t) * angle) * a + math.sin(t * angle) * b) / math.sin(angle)
    assert torch.allclose(slerp(a, b, t), expected, atol=1e-6)


def test_slerp_falls_back_to_a_straight_line_when_colinear():
    a = torch.tensor([1.0, -2.0, 0.5])
    for b in (2.5 * a, -a, a + 1e-5):
        assert torch.allclose(slerp(a, b, 0.3), 0.7 * a + 0.3 * b, atol=1e-6)
    assert torch.equal(slerp(torch.zeros(3), a, 0.5), 0.5 * a)  # a zero tensor has no direction


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(method="average"), "unknown merge method 'average'; accepted: linear, task_arithmetic"),
        (dict(method="ties"), "ties needs a density"),
        (dict(method="dare_ties", density=0.0), "density in (0, 1]"),
        (dict(method="ties", density=1.5), "density in (0, 1]"),
        (dict(method="linear", density=0.5), "linear takes no density"),
        (dict(method="linear", weights=(1.0, -1.0)), "positive weights"),
        (dict(method="slerp", weights=(1.0, 1.0)), "slerp takes t"),
        (dict(method="slerp", t=1.5), "t must be in [0, 1]"),
        (dict(method="ties", density=0.5, majority_sign="mass"), "accepted: total, frequency"),
        (dict(method="task_arithmetic", weights=(1.0, float("nan"))), "finite numbers"),
    ],
)
def test_bad_settings_are_refused_when_built(kwargs, words):
    with pytest.raises(MergeError, match=None) as caught:
        MergeConfig(**kwargs)
    assert words in str(caught.value)


@pytest.mark.parametrize(
    "config, count, base, words",
    [
        (MergeConfig("slerp"), 3, False, "exactly two models; got 3"),
        (MergeConfig("linear"), 1, False, "at least two models"),
        (MergeConfig("ties", density=0.5), 2, False, "needs the base model"),
        (MergeConfig("linear"), 2, True, "takes no base"),
        (MergeConfig("task_arithmetic", weights=(1.0,)), 2, True, "1 weight(s) for 2 model(s)"),
    ],
)
def test_inputs_the_method_cannot_take_are_refused(config, count, base, words):
    with pytest.raises(MergeError) as caught:
        config.check_inputs(count, base)
    assert words in str(caught.value)


# ----------------------------------------------------------------------------- state dicts and models
def fine_tuned(base, seed: int, scale: float = 0.05):
    """A copy of `base` with every parameter moved a little: a stand-in for a fine-tuned model."""
    model = tiny_model()
    model.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return model.eval()


def test_merge_state_dicts_applies_the_method_to_each_task_vector():
    base = tiny_model().eval()
    models = [fine_tuned(base, seed) for seed in (1, 2, 3)]
    states = [dict(m.named_parameters()) for m in models]
    base_state = dict(base.named_parameters())
    config = MergeConfig("ties", weights=tuple(WEIGHTS), density=0.4)
    merged = merge_state_dicts([{k: v.detach() for k, v in s.items()} for s in states], config, base.state_dict())
    for key, origin in base_state.items():
        vectors = [s[key].detach() - origin.detach() for s in states]
        expected = origin.detach() + merge_utils.ties(vectors, torch.tensor(WEIGHTS), 0.4)
        assert torch.allclose(merged[key], expected, atol=1e-6), key


def test_dare_over_models_is_seeded_and_equals_peft_in_key_order():
    base = tiny_model().eval()
    models = [fine_tuned(base, seed) for seed in (1, 2)]
    config = MergeConfig("dare_linear", weights=(1.0, 0.5), density=0.3, seed=7)
    states = [{k: v.detach() for k, v in m.named_parameters()} for m in models]
    origin = {k: v.detach() for k, v in base.named_parameters()}
    merged = merge_state_dicts(states, config, origin)
    assert all(torch.equal(merged[k], v) for k, v in merge_state_dicts(states, config, origin).items())
    torch.manual_seed(7)
    for key in states[0]:
        vectors = [s[key] - origin[key] for s in states]
        expected = origin[key] + merge_utils.dare_linear(vectors, torch.tensor([1.0, 0.5]), 0.3)
        assert torch.allclose(merged[key], expected, atol=1e-6), key
    other = merge_state_dicts(states, MergeConfig("dare_linear", weights=(1.0, 0.5), density=0.3, seed=8), origin)
    assert not torch.equal(other["embed_tokens.weight"], merged["embed_tokens.weight"])


def test_shape_and_name_mismatches_name_both():
    small, wide = tiny_model(), tiny_model(intermediate_size=64)
    with pytest.raises(MergeError) as caught:
        merge_models([small, wide], MergeConfig("linear"), names=["small", "wide"])
    message = str(caught.value)
    assert "blocks.0.mlp.gate_up.weight is (96, 32) in small but (128, 32) in wide" in message
    deeper = tiny_model(num_layers=3)
    with pytest.raises(MergeError, match="deep lacks|deep has extra"):
        merge_models([small, deeper], MergeConfig("linear"), names=["small", "deep"])


def test_merge_models_writes_into_the_first_model_and_a_tied_head_stays_tied():
    base = tiny_model(tie_word_embeddings=True).eval()
    models = [tiny_model(seed, tie_word_embeddings=True).eval() for seed in (1, 2)]
    expected = (models[0].embed_tokens.weight + 3 * models[1].embed_tokens.weight).detach() / 4
    merged = merge_models(models, MergeConfig("linear", weights=(1, 3)))
    assert merged is models[0]
    assert merged.lm_head.weight is merged.embed_tokens.weight
    assert torch.allclose(merged.embed_tokens.weight, expected, atol=1e-6)
    del base


def test_slerp_of_two_models_is_per_tensor():
    first, second = tiny_model(1).eval(), tiny_model(2).eval()
    pairs = {k: (v.detach().clone(), dict(second.named_parameters())[k].detach()) for k, v in first.named_parameters()}
    merge_models([first, second], MergeConfig("slerp", t=0.3))
    for key, parameter in first.named_parameters():
        assert torch.allclose(parameter, slerp(*pairs[key], 0.3), atol=1e-6), key


# ----------------------------------------------------------------------------- checkpoint directories
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny base and two models fine-tuned from it, saved as Hugging Face directories."""
    root = tmp_path_factory.mktemp("merge")
    base = tiny_model().eval()
    save_model(base, root / "base")
    for seed in (1, 2):
        save_model(fine_tuned(base, seed), root / f"model{seed}")
    return root


def test_merge_checkpoints_writes_what_the_library_merge_gives(checkpoints, tmp_path):
    config = MergeConfig("ties", weights=(1.0, 0.6), density=0.5, majority_sign="frequency")
    dirs = [checkpoints / "model1", checkpoints / "model2"]
    merge_checkpoints(dirs, tmp_path / "merged", config, base_dir=checkpoints / "base")
    written = load_model(tmp_path / "merged")
    expected = merge_models([load_model(d) for d in dirs], config, load_model(checkpoints / "base"))
    for (key, got), want in zip(written.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(got, want), key
    with torch.no_grad():
        tokens = TOKENS % 64  # the tiny model's vocabulary
        assert not torch.equal(written(tokens).logits, load_model(dirs[0])(tokens).logits)


def test_merge_checkpoints_keeps_the_saved_dtype_unless_told(checkpoints, tmp_path):
    half = tmp_path / "half"
    save_model(load_model(checkpoints / "model1").to(torch.bfloat16), half)
    other = tmp_path / "other"
    save_model(load_model(checkpoints / "model2").to(torch.bfloat16), other)
    merge_checkpoints([half, other], tmp_path / "soup", MergeConfig("linear"))
    assert load_model(tmp_path / "soup", dtype="auto").dtype == torch.bfloat16
    merge_checkpoints([half, other], tmp_path / "soup32", MergeConfig("linear"), dtype="float32")
    assert load_model(tmp_path / "soup32", dtype="auto").dtype == torch.float32


def test_merge_checkpoints_refuses_other_architectures_before_loading(checkpoints, tmp_path):
    save_model(tiny_model(hidden_size=48, num_heads=4), tmp_path / "wider")
    with pytest.raises(MergeError) as caught:
        merge_checkpoints([checkpoints / "model1", tmp_path / "wider"], tmp_path / "out", MergeConfig("linear"))
    message = str(caught.value)
    assert "hidden_size 32 in" in message and "but 48 in" in message and str(tmp_path / "wider") in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(MergeError, match="one of the input models"):
        merge_checkpoints(
            [checkpoints / "model1", checkpoints / "model2"], checkpoints / "model1", MergeConfig("linear")
        )


# ----------------------------------------------------------------------------- LoRA adapters
@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return saved_families(tmp_path_factory)


ADAPTERS = {
    "llama": [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"]),
    ],
    "gpt2": [
        dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
        dict(r=2, lora_alpha=3, target_modules=["c_attn", "c_fc"]),
    ],
}


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """family -> directories of two PEFT-saved adapters of different ranks and targets."""
    saved = {}

    def get(family: str):
        if family not in saved:
            root = tmp_path_factory.mktemp(f"adapters-{family}")
            saved[family] = []
            for index, lora in enumerate(ADAPTERS[family]):
                model = peft.get_peft_model(reference_models.build(family), peft.LoraConfig(**lora))
                randomize(model.named_parameters(), seed=index + 1)
                model.save_pretrained(root / f"adapter{index}")
                saved[family].append(root / f"adapter{index}")
        return saved[family]

    return get


def peft_combined(family: str, dirs, weights, combination_type: str, **kwargs):
    model = peft.PeftModel.from_pretrained(reference_models.build(family), dirs[0], adapter_name="a0")
    model.load_adapter(dirs[1], adapter_name="a1")
    model.add_weighted_adapter(["a0", "a1"], weights, "combined", combination_type=combination_type, **kwargs)
    model.set_adapter("combined")
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cat_combination_gives_peft_logits(family, base_dir, adapter_dirs, tmp_path):
    dirs, weights = adapter_dirs(family), [0.7, -1.3]
    combine_lora_adapters(
        load_model(base_dir(family)), dirs, tmp_path / "cat", MergeConfig("task_arithmetic", weights=tuple(weights))
    )

    ours = load_adapter(load_model(base_dir(family)), tmp_path / "cat")
    reference = peft_combined(family, dirs, weights, "cat")
    with torch.no_grad():
        expected = reference(TOKENS).logits
        got = ours(TOKENS).logits
        base = load_model(base_dir(family))(TOKENS).logits
        # PEFT reads the combined adapter as genforge wrote it, too.
        reloaded = peft.PeftModel.from_pretrained(reference_models.build(family), tmp_path / "cat").eval()
        assert (reloaded(TOKENS).logits - expected).abs().max() < 1e-4
    assert (got - expected).abs().max() < 1e-4
    assert (expected - base).abs().max() > 1e-2  # the adapters do change the logits
    assert ours.lora_config.r == 6  # 4 + 2: the ranks add up


def test_adapters_merged_into_the_base_equal_the_cat_adapter(base_dir, adapter_dirs):
    dirs, weights = adapter_dirs("llama"), (0.7, -1.3)
    merged = merge_lora_adapters(load_model(base_dir("llama")), dirs, MergeConfig("task_arithmetic", weights=weights))
    reference = peft_combined("llama", dirs, list(weights), "cat")
    with torch.no_grad():
        assert (merged(TOKENS).logits - reference(TOKENS).logits).abs().max() < 1e-4
    assert not any("lora" in name for name in merged.state_dict())


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_svd_combination_gives_peft_logits(method, base_dir, adapter_dirs, tmp_path, monkeypatch):
    dirs, weights = adapter_dirs("llama"), [1.0, 0.8]
    config = MergeConfig(method, weights=tuple(weights), density=0.5, seed=3)
    # PEFT draws DARE's masks from the global generator, module by module in the model's order,
    # after its new adapter's initialisation has drawn from it too: seed it at the first mask.
    draw_masks = merge_utils.random_pruning
    seeded = []

    def from_seed(tensor, density, rescale):
        if not seeded:
            torch.manual_seed(3)
            seeded.append(True)
        return draw_masks(tensor, density, rescale)

    monkeypatch.setattr(merge_utils, "random_pruning", from_seed)
    reference = peft_combined("llama", dirs, weights, f"{method}_svd", density=0.5, svd_rank=4)
    combine_lora_adapters(load_model(base_dir("llama")), dirs, tmp_path / "svd", config, combination="svd", svd_rank=4)

    ours = load_adapter(load_model(base_dir("llama")), tmp_path / "svd")
    with torch.no_grad():
        assert (ours(TOKENS).logits - reference(TOKENS).logits).abs().max() < 1e-4


def test_combining_leaves_the_model_as_it_was(base_dir, adapter_dirs, tmp_path):
    model = load_model(base_dir("llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    combine_lora_adapters(model, adapter_dirs("llama"), tmp_path / "cat")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters())


def test_bad_adapter_combinations_are_refused(base_dir, adapter_dirs, tmp_path):
    dirs = adapter_dirs("llama")
    model = load_model(base_dir("llama"))
    with pytest.raises(MergeError, match="ties needs combination 'svd'"):
        combine_lora_adapters(model, dirs, tmp_path / "x", MergeConfig("ties", density=0.5))
    with pytest.raises(MergeError, match="1 weight\\(s\\) for 2 adapter\\(s\\)"):
        merge_lora_adapters(model, dirs, MergeConfig("task_arithmetic", weights=(1.0,)))
    with pytest.raises(MergeError, match="slerp interpolates two whole models"):
        merge_lora_adapters(model, dirs, MergeConfig("slerp"))
    dora = apply_lora(load_model(base_dir("llama")), LoraConfig(["q_proj"], r=2, use_dora=True))
    save_adapter(dora, tmp_path / "dora")
    with pytest.raises(MergeError, match="is DoRA"):
        merge_lora_adapters(model, [dirs[0], tmp_path / "dora"])
    assert not any("lora" in name for name in model.state_dict())
