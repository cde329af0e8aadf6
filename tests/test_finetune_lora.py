"""LoRA (genforge.finetune.lora) checked against PEFT on tiny random Llama (GQA) and GPT-2
models: the same adapter gives the same logits and gradients, and adapter directories go both
ways between genforge and PEFT."""

import json

import peft
import pytest
import reference_models
import torch
import torch.nn.functional as F
from finetune_shared import TOKENS, randomize, saved_families
from safetensors.torch import load_file, save_file

from genforge.checkpoint import LinearParts, hf_linear_parts, load_model, save_model
from genforge.finetune import (
    LoraConfig,
    LoraError,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_state_dict,
    merge_and_unload,
    merge_lora,
    peft_names,
    save_adapter,
    trainable_parameter_count,
    unmerge_lora,
)
from genforge.finetune.lora import lora_update

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return saved_families(tmp_path_factory)


def peft_model(family: str, **lora):
    model = peft.get_peft_model(reference_models.build(family), peft.LoraConfig(**lora))
    randomize(model.named_parameters())
    return model.eval()


def peft_parameter(model, peft_key: str):
    """PEFT's live parameter for a saved key (the adapter name sits before `.weight`)."""
    return model.get_parameter(peft_key.replace(".weight", ".default.weight"))


def test_each_linear_layer_knows_its_hugging_face_parts(base_dir):
    llama = hf_linear_parts(load_model(base_dir("llama")))
    attention = "model.layers.1.self_attn"
    assert llama["blocks.1.attn.qkv"] == LinearParts(
        (f"{attention}.q_proj", f"{attention}.k_proj", f"{attention}.v_proj"), (64, 32, 32), False
    )  # GQA: 2 key/value heads of 16 for 4 query heads
    assert llama["blocks.0.mlp.gate_up"].names == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert llama["lm_head"] == LinearParts(("lm_head",), (96,), False)
    gpt2 = hf_linear_parts(load_model(base_dir("gpt2")))
    assert gpt2["blocks.0.attn.qkv"] == LinearParts(("transformer.h.0.attn.c_attn",), (192,), True)
    tied = hf_linear_parts(load_model(base_dir("llama-mqa-tied")))
    assert tied["lm_head"].names == ("lm_head",)


PEFT_CASES = {
    "llama q,v (k untargeted)": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama all, patterns": (
        "llama",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"],
            rank_pattern={"k_proj": 2, "model.layers.1.mlp.up_proj": 6},
            alpha_pattern={"v_proj": 3, "down_proj": 16},
        ),
    ),
    "llama rslora, up only of gate_up": (
        "llama",
        dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"]),
    ),
    "gpt2 c_attn, c_proj, c_fc": ("gpt2", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2 rslora, patterns": (
        "gpt2",
        dict(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["c_attn", "c_fc"],
            rank_pattern={"transformer.h.1.attn.c_attn": 8},
            alpha_pattern={"c_fc": 2},
        ),
    ),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_a_peft_adapter_gives_peft_logits(case, base_dir, tmp_path):
    family, lora = PEFT_CASES[case]
    reference = peft_model(family, **lora)
    reference.save_pretrained(tmp_path / "adapter")
    model = load_adapter(load_model(base_dir(family)), tmp_path / "adapter")
    with torch.no_grad():
        expected = reference(TOKENS).logits
        got = model(TOKENS).logits
    assert (got - expected).abs().max() < 1e-4
    # Every LoRA tensor PEFT saved is placed, none twice (PEFT also saves a targeted lm_head's base weight).
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sorted(peft_names(model).values()) == sorted(key for key in stored if ".base_layer." not in key)


def test_the_adapter_changes_the_logits(base_dir, tmp_path):
    """Guards the parity test: a zero or unplaced update would pass it trivially."""
    family, lora = PEFT_CASES["llama q,v (k untargeted)"]
    reference = peft_model(family, **lora)
    reference.save_pretrained(tmp_path / "adapter")
    base = load_model(base_dir(family))
    with torch.no_grad():
        before = base(TOKENS).logits
        after = load_adapter(base, tmp_path / "adapter")(TOKENS).logits
    assert (after - before).abs().max() > 1e-2


@pytest.mark.parametrize(
    "family, lora",
    [
        ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])),
        ("gpt2", dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["c_attn", "c_fc"])),
    ],
)
def test_lora_gradients_equal_peft(family, lora, base_dir, tmp_path):
    reference = peft_model(family, **lora)
    reference.save_pretrained(tmp_path / "adapter")
    model = load_adapter(load_model(base_dir(family)), tmp_path / "adapter")

    def loss(logits):  # the same next-token loss on both
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), TOKENS[:, 1:].reshape(-1))

    loss(reference(TOKENS).logits).backward()
    loss(model(TOKENS).logits).backward()
    names = peft_names(model)
    assert len(names) == sum(1 for n, p in reference.named_parameters() if p.requires_grad)
    for name, peft_key in names.items():
        ours, theirs = model.get_parameter(name).grad, peft_parameter(reference, peft_key).grad
        assert theirs.abs().max() > 0
        assert (ours - theirs).abs().max() < 1e-4, name


ROUND_TRIPS = {
    "llama genforge names, patterns": (
        "llama",
        LoraConfig(
            target_modules=["qkv", "down"],
            r=4,
            lora_alpha=8,
            rank_pattern={"k_proj": 2},
            alpha_pattern={"blocks.1.attn.qkv": 16},
        ),
    ),
    "llama one module of one layer": ("llama", LoraConfig(target_modules=["model.layers.0.self_attn.q_proj"], r=2)),
    "llama regex": ("llama", LoraConfig(target_modules=r".*\.(gate_up|o)", r=3, lora_alpha=6, use_rslora=True)),
    "gpt2 genforge names, rslora": ("gpt2", LoraConfig(target_modules=["qkv", "up"], r=4, use_rslora=True)),
}


@pytest.mark.parametrize("case", list(ROUND_TRIPS))
def test_a_genforge_adapter_loads_in_peft(case, base_dir, tmp_path):
    family, config = ROUND_TRIPS[case]
    model = apply_lora(load_model(base_dir(family)), config)
    randomize(model.named_parameters())
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny-" + family)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM" and saved["bias"] == "none"
    assert saved["fan_in_fan_out"] == (family == "gpt2")
    assert saved["base_model_name_or_path"] == "tiny-" + family
    reference = peft.PeftModel.from_pretrained(reference_models.build(family), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (reference(TOKENS).logits - model(TOKENS).logits).abs().max() < 1e-4
    # PEFT built the same modules with the same tensors.
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for peft_key, tensor in stored.items():
        assert torch.equal(peft_parameter(reference, peft_key), tensor)
    assert len(stored) == sum(1 for n, _ in reference.named_parameters() if "lora_" in n)


def test_save_adapter_then_load_adapter_is_exact(base_dir, tmp_path):
    config = LoraConfig(target_modules=["q_proj", "v_proj", "gate_up"], r=4, rank_pattern={"v_proj": 2})
    model = apply_lora(load_model(base_dir("llama")), config)
    randomize(model.named_parameters())
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter(load_model(base_dir("llama")), tmp_path / "adapter")
    assert lora_state_dict(again).keys() == lora_state_dict(model).keys()
    for name, tensor in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(again)[name], tensor)
    assert [(p.key, p.r, p.scaling) for p in again.blocks[0].attn.qkv.parts] == [
        ("q_proj", 4, 2.0),
        ("v_proj", 2, 4.0),
    ]


# --------------------------------------------------------------------------- the layer
def lora_llama(base_dir, **config):
    model = apply_lora(load_model(base_dir("llama")), LoraConfig(**config))
    randomize(model.named_parameters())
    return model.eval()


def test_merge_and_unmerge_are_exact(base_dir):
    model = lora_llama(base_dir, target_modules=["q_proj", "v_proj", "o", "gate_up", "down", "lm_head"], r=4)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    with torch.no_grad():
        unmerged = model(TOKENS).logits
        merge_lora(model)
        assert all(layer.merged for layer in model.modules() if isinstance(layer, LoraLinear))
        assert (model(TOKENS).logits - unmerged).abs().max() < 1e-5
        assert not torch.equal(model.blocks[0].attn.qkv.weight, base_weights["blocks.0.attn.qkv.weight"])
        # k has no LoRA: its rows of the fused weight do not move.
        assert torch.equal(model.blocks[0].attn.qkv.weight[64:96], base_weights["blocks.0.attn.qkv.weight"][64:96])
        merge_lora(model)  # a second merge changes nothing
        assert (model(TOKENS).logits - unmerged).abs().max() < 1e-5
        unmerge_lora(model)
        for name, weight in base_weights.items():
            assert (model.get_parameter(name) - weight).abs().max() < 1e-6, name
        assert (model(TOKENS).logits - unmerged).abs().max() < 1e-5


def test_merge_and_unload_leaves_a_plain_model_that_exports(base_dir, tmp_path):
    model = lora_llama(base_dir, target_modules=["qkv", "down"], r=4)
    with torch.no_grad():
        adapted = model(TOKENS).logits
        merge_and_unload(model)
        assert not any(isinstance(m, LoraLinear) for m in model.modules())
        assert set(model.state_dict()) == set(load_model(base_dir("llama")).state_dict())
        assert (model(TOKENS).logits - adapted).abs().max() < 1e-5
        exported = load_model(save_model(model, tmp_path / "merged"))
        assert (exported(TOKENS).logits - adapted).abs().max() < 1e-5


def test_the_base_keeps_its_keys_and_only_lora_trains(base_dir):
    base = load_model(base_dir("llama"))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora(base, LoraConfig(target_modules=["q_proj", "v_proj", "down"], r=4))
    state = model.state_dict()
    lora_keys = set(state) - set(base_state)
    assert lora_keys == set(lora_state_dict(model)) == set(peft_names(model))
    assert "blocks.0.attn.qkv.lora_A.q_proj" in lora_keys and "blocks.1.mlp.down.lora_B.down_proj" in lora_keys
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == lora_keys
    count, total = trainable_parameter_count(model)
    # Per layer: q (4x64 + 64x4), v (4x64 + 32x4), down (4x112 + 64x4).
    assert count == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4 + 4 * 112 + 64 * 4)
    assert total == count + sum(v.numel() for v in base_state.values())


def test_a_training_step_moves_only_the_lora_tensors(base_dir):
    model = apply_lora(load_model(base_dir("llama")), LoraConfig(target_modules=["qkv"], r=4, lora_dropout=0.1))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    logits = model(TOKENS).logits
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), TOKENS[:, 1:].reshape(-1)).backward()
    optimizer.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n in before if ".lora_B." in n}  # B starts at zero, so A's first gradient is zero


def test_a_bfloat16_model_keeps_its_adapter_in_float32(base_dir):
    """As PEFT's autocast_adapter_dtype: the update is computed in float32 and added in bfloat16."""
    model = apply_lora(load_model(base_dir("llama"), dtype="bfloat16"), LoraConfig(target_modules=["qkv"], r=4))
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.float32}
    assert model(TOKENS).logits.dtype == torch.bfloat16


def test_dropout_applies_in_training_only(base_dir):
    model = lora_llama(base_dir, target_modules=["qkv"], r=4, lora_dropout=0.5)
    with torch.no_grad():
        evaluated = model(TOKENS).logits
        assert torch.equal(model(TOKENS).logits, evaluated)
        model.train()
        assert (model(TOKENS).logits - evaluated).abs().max() > 1e-4


# -------------------------------------------------------------------------- refusals
def test_an_unknown_target_lists_the_names_in_both_conventions(base_dir):
    model = load_model(base_dir("llama"))
    with pytest.raises(LoraError, match="'query'") as caught:
        apply_lora(model, LoraConfig(target_modules=["q_proj", "query"]))
    message = str(caught.value)
    assert "qkv" in message and "gate_up" in message and "q_proj" in message and "gate_proj" in message
    assert not any(isinstance(m, LoraLinear) for m in model.modules())  # refused before any change


@pytest.mark.parametrize(
    "config, words",
    [
        (dict(target_modules=["q_proj"], r=65), "min(in, out) = min(64, 64) = 64"),
        (dict(target_modules=["qkv"], r=4, rank_pattern={"k_proj": 33}), "k_proj"),
    ],
)
def test_a_rank_beyond_the_layer_is_refused(config, words, base_dir):
    with pytest.raises(LoraError, match=r"r=\d+ for .*larger than") as caught:
        apply_lora(load_model(base_dir("llama")), LoraConfig(**config))
    assert words in str(caught.value)


@pytest.mark.parametrize(
    "config, words",
    [
        (dict(target_modules=["qkv"], bias="all"), "bias='all' is not supported yet; accepted: 'none'"),
        (dict(target_modules=["qkv"], r=0), "r must be an integer rank of at least 1; got 0"),
        (dict(target_modules=["qkv"], lora_alpha=-1), "lora_alpha must be a positive number"),
        (dict(target_modules=["qkv"], lora_dropout=1.0), "lora_dropout must be a probability"),
        (dict(target_modules=[]), "target_modules must be a non-empty list"),
        (dict(target_modules="(unclosed"), "is not a regular expression"),
        (dict(target_modules=["qkv"], rank_pattern={"o": 0}), "rank_pattern['o']"),
    ],
)
def test_bad_configs_are_refused_when_built(config, words):
    with pytest.raises(LoraError) as caught:
        LoraConfig(**config)
    assert words in str(caught.value)


def test_a_second_adapter_and_a_tied_head_are_refused(base_dir):
    model = apply_lora(load_model(base_dir("llama")), LoraConfig(target_modules=["qkv"]))
    with pytest.raises(LoraError, match="already has LoRA layers"):
        apply_lora(model, LoraConfig(target_modules=["o"]))
    with pytest.raises(LoraError, match="tied embeddings"):
        apply_lora(load_model(base_dir("llama-mqa-tied")), LoraConfig(target_modules=["lm_head"]))


def test_an_adapter_for_another_model_says_what_does_not_fit(base_dir, tmp_path):
    peft_model("llama", r=4, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path / "llama")
    gpt2 = load_model(base_dir("gpt2"))
    with pytest.raises(LoraError, match="does not fit this model.*_proj', '.*_proj' match no.*c_attn"):
        load_adapter(gpt2, tmp_path / "llama")
    assert not any(isinstance(m, LoraLinear) for m in gpt2.modules())

    # The config and the tensors disagree on r: both shapes are named.
    config_path = tmp_path / "llama" / "adapter_config.json"
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"r": 2}))
    with pytest.raises(LoraError, match=r"is \(4, 64\), this model needs \(2, 64\)"):
        load_adapter(load_model(base_dir("llama")), tmp_path / "llama")

    # A tensor the config does not place.
    config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"r": 4, "target_modules": ["q_proj"]}))
    with pytest.raises(LoraError, match="not placed on this model: .*v_proj"):
        load_adapter(load_model(base_dir("llama")), tmp_path / "llama")


def test_an_adapter_loads_where_peft_would_though_some_targets_match_nothing(base_dir, tmp_path):
    """PEFT needs one target to match, not each: a shared config naming other families' modules loads."""
    reference = peft_model("llama", r=4, target_modules=["q_proj", "v_proj"])
    reference.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config_path.write_text(
        json.dumps(json.loads(config_path.read_text()) | {"target_modules": ["q_proj", "v_proj", "c_attn"]})
    )
    model = load_adapter(load_model(base_dir("llama")), tmp_path / "adapter")
    with torch.no_grad():
        assert (model(TOKENS).logits - reference(TOKENS).logits).abs().max() < 1e-4


def test_unsupported_adapters_are_refused(base_dir, tmp_path):
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "use_qalora": True})
    )
    save_file({}, directory / "adapter_model.safetensors")
    with pytest.raises(LoraError, match="uses QALoRA"):
        load_adapter(load_model(base_dir("llama")), directory)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["q_proj"]}))
    with pytest.raises(LoraError, match="'IA3' adapter"):
        load_adapter(load_model(base_dir("llama")), directory)
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"]}))
    (directory / "adapter_model.safetensors").unlink()
    (directory / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(LoraError, match="only the pickled adapter_model.bin"):
        load_adapter(load_model(base_dir("llama")), directory)


@pytest.mark.parametrize(
    "parts, x_needs_grad",
    [
        ([(0, 12, 2.0)], True),  # one part over every row: the single-product path
        ([(0, 5, 2.0), (9, 3, 0.5)], True),  # rows 5-8 have no adapter (PEFT's q and v, no k)
        ([(2, 4, 1.5), (6, 4, 4.0)], False),  # leading and trailing rows without one; x frozen
    ],
)
def test_lora_update_is_the_formula_with_its_gradients(parts, x_needs_grad):
    """lora_update against base + s B A x written row block by row block, values and every gradient."""
    generator = torch.Generator().manual_seed(0)
    ranks = [3, 2][: len(parts)]
    x = torch.randn(2, 5, 7, generator=generator).requires_grad_(x_needs_grad)
    base = torch.randn(2, 5, 12, generator=generator).requires_grad_()
    a = [torch.randn(r, 7, generator=generator).requires_grad_() for r in ranks]
    b = [torch.randn(rows, r, generator=generator).requires_grad_() for (_, rows, _), r in zip(parts, ranks)]
    out_grad = torch.randn(2, 5, 12, generator=generator)

    def formula():
        pieces, row = [], 0
        for (start, rows, scale), part_a, part_b in zip(parts, a, b):
            pieces += [torch.zeros(2, 5, start - row), scale * (x @ part_a.t() @ part_b.t())]
            row = start + rows
        return base + torch.cat([*pieces, torch.zeros(2, 5, 12 - row)], dim=-1)

    tensors = [t for t in (x, base, *a, *b) if t.requires_grad]
    expected = formula()
    expected_grads = torch.autograd.grad(expected, tensors, out_grad)
    got = lora_update(x, base, parts, a, b)
    got_grads = torch.autograd.grad(got, tensors, out_grad)
    torch.testing.assert_close(got, expected)
    for ours, reference in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(ours, reference)
