"""Prompt tuning, P-tuning and prefix tuning (genforge.finetune.prompts) checked against PEFT
0.21.2 on tiny random Llama (GQA) and GPT-2 models: the same prompt weights give the same
logits (plain, right-padded, left-padded), gradients and greedy tokens; adapter directories go
both ways; training moves only the prompt parameters, with or without gradient checkpointing."""

import json

import peft
import pytest
import reference_models
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from finetune_shared import TOKENS, saved_families
from safetensors.torch import load_file

from genforge.cache import ContiguousKVCache
from genforge.checkpoint import load_model
from genforge.finetune.prompts import (
    PrefixTunedModel,
    PrefixTuningConfig,
    PromptLearningError,
    PromptTunedModel,
    PromptTuningConfig,
    PTuningConfig,
    apply_p_tuning,
    apply_prefix_tuning,
    apply_prompt_learning,
    apply_prompt_tuning,
    load_prompt_adapter,
    save_prompt_adapter,
)
from genforge.generate.generator import generate
from genforge.generate.sampling import SamplingParams
from genforge.train import TokenDataset, TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

P = 4
# name -> (family, PEFT config, the same method's genforge config)
CASES = {
    "prompt tuning": (
        "llama",
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
        PromptTuningConfig(P),
    ),
    "p-tuning MLP": (
        "llama",
        peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=24),
        PTuningConfig(P, encoder_hidden_size=24),
    ),
    "p-tuning LSTM": (
        "llama",
        peft.PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=P, encoder_hidden_size=24, encoder_reparameterization_type="LSTM"
        ),
        PTuningConfig(P, "LSTM", encoder_hidden_size=24),
    ),
    "prefix tuning": (
        "llama",
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
        PrefixTuningConfig(P),
    ),
    "prefix tuning, projection": (
        "llama",
        peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=24
        ),
        PrefixTuningConfig(P, prefix_projection=True, encoder_hidden_size=24),
    ),
    "prompt tuning, gpt2": (
        "gpt2",
        peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
        PromptTuningConfig(P),
    ),
    "prefix tuning, gpt2": (
        "gpt2",
        peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
        PrefixTuningConfig(P),
    ),
}
LLAMA_CASES = [name for name in CASES if CASES[name][0] == "llama"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return saved_families(tmp_path_factory)


def randomize(encoder, seed: int = 1) -> None:
    """Prompt weights of a moderate size: N(0, 1) virtual tokens (PEFT's init) swamp these
    tiny models' 0.02-scale embeddings, and every row would then decode the same."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.normal_(0, 0.3)


def pair(case: str, base_dir):
    """(PEFT model, genforge model) with the same random prompt weights, in eval mode."""
    family, peft_config, config = CASES[case]
    reference = peft.get_peft_model(reference_models.build(family), peft_config)
    randomize(reference.prompt_encoder.default)
    model = apply_prompt_learning(load_model(base_dir(family)), config)
    model.prompt_encoder.load_state_dict(reference.prompt_encoder.default.state_dict())
    return reference.eval(), model.eval()


def input_logits(output, seq: int = TOKENS.shape[1]):
    # PEFT returns logits at the virtual positions too for prompt and P-tuning; these are the input's.
    return output.logits[:, -seq:]


def next_token_loss(logits, tokens=TOKENS):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@pytest.mark.parametrize("case", list(CASES))
def test_the_same_prompt_weights_give_peft_logits(case, base_dir):
    reference, model = pair(case, base_dir)
    right_padded = torch.ones_like(TOKENS)
    right_padded[1, -3:] = 0
    with torch.no_grad():
        got = model(TOKENS).logits
        assert got.shape == (*TOKENS.shape, reference_models.VOCAB)
        assert (got - input_logits(reference(TOKENS))).abs().max() < 1e-4
        # The virtual tokens change the model's output.
        assert (got - model.base_model(TOKENS).logits).abs().max() > 1e-2
        theirs = input_logits(reference(TOKENS, attention_mask=right_padded))
        ours = model(TOKENS, attention_mask=right_padded).logits
        assert ((ours - theirs) * right_padded[..., None]).abs().max() < 1e-4
        hidden = model(TOKENS, compute_logits=False)
        assert hidden.logits is None and hidden.hidden_states.shape == (*TOKENS.shape, 64)


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_a_left_padded_row_gets_the_logits_peft_gives_it_alone(case, base_dir):
    # genforge numbers positions from a row's first real token (PEFT's forward, given no
    # position ids, would count the padding); each row then equals PEFT on the row alone.
    reference, model = pair(case, base_dir)
    short = TOKENS[1, 3:]
    batch = torch.stack((TOKENS[0], torch.cat((torch.zeros(3, dtype=torch.long), short))))
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    with torch.no_grad():
        got = model(batch, attention_mask=mask).logits
        assert (got[0] - input_logits(reference(TOKENS[:1]))[0]).abs().max() < 1e-4
        alone = input_logits(reference(short[None]), seq=len(short))[0]
        assert (got[1, 3:] - alone).abs().max() < 1e-4


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_prompt_gradients_equal_peft(case, base_dir):
    reference, model = pair(case, base_dir)
    next_token_loss(input_logits(reference(TOKENS))).backward()
    next_token_loss(model(TOKENS).logits).backward()
    theirs = dict(reference.prompt_encoder.default.named_parameters())
    ours = dict(model.prompt_encoder.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, parameter in ours.items():
        assert theirs[name].grad.abs().max() > 0, name
        assert (parameter.grad - theirs[name].grad).abs().max() < 1e-4, name
    assert all(p.grad is None for p in model.base_model.parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_a_genforge_adapter_loads_in_peft_and_back(case, base_dir, tmp_path):
    family, peft_config, _ = CASES[case]
    _, model = pair(case, base_dir)
    save_prompt_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft_config.peft_type.value and saved["task_type"] == "CAUSAL_LM"
    assert saved["num_virtual_tokens"] == P and saved["base_model_name_or_path"] == "tiny"
    stored = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert list(stored) == ["prompt_embeddings"]
    reference = peft.PeftModel.from_pretrained(reference_models.build(family), tmp_path / "adapter").eval()
    again = load_prompt_adapter(load_model(base_dir(family)), tmp_path / "adapter").eval()
    assert type(again) is type(model)
    with torch.no_grad():
        ours = model(TOKENS).logits
        assert (input_logits(reference(TOKENS)) - ours).abs().max() < 1e-4
        assert (again(TOKENS).logits - ours).abs().max() < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_a_peft_adapter_loads_in_genforge(case, base_dir, tmp_path):
    family = CASES[case][0]
    reference, _ = pair(case, base_dir)
    reference.save_pretrained(tmp_path / "adapter")
    model = load_prompt_adapter(load_model(base_dir(family)), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (model(TOKENS).logits - input_logits(reference(TOKENS))).abs().max() < 1e-4
    # The loaded table trains from here; the base stays frozen.
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt_encoder.embedding.weight"]


@pytest.mark.parametrize("case", LLAMA_CASES)
def test_greedy_tokens_equal_peft_generate(case, base_dir):
    reference, model = pair(case, base_dir)
    new = 6
    expected = reference.generate(
        input_ids=TOKENS, attention_mask=torch.ones_like(TOKENS), max_new_tokens=new, do_sample=False, pad_token_id=0
    )[:, TOKENS.shape[1] :]
    completions = generate(
        model, TOKENS.tolist(), SamplingParams(temperature=0.0, max_new_tokens=new), eos_token_ids=[]
    )
    assert [c.token_ids for c in completions] == expected.tolist()
    assert len({tuple(row) for row in expected.tolist()}) == 2  # the rows decode differently


@pytest.mark.parametrize("case", ["prompt tuning", "prefix tuning"])
def test_greedy_tokens_of_a_left_padded_batch_equal_peft_on_each_prompt(case, base_dir):
    reference, model = pair(case, base_dir)
    prompts = [TOKENS[0].tolist(), TOKENS[1, 4:].tolist()]
    completions = generate(model, prompts, SamplingParams(temperature=0.0, max_new_tokens=5), eos_token_ids=[])
    for prompt, completion in zip(prompts, completions, strict=True):
        ids = torch.tensor([prompt])
        expected = reference.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0
        )
        assert completion.token_ids == expected[0, len(prompt) :].tolist()


def test_a_cached_decode_step_equals_the_full_forward(base_dir):
    for case in ("p-tuning MLP", "prefix tuning"):
        _, model = pair(case, base_dir)
        with torch.no_grad():
            full = model(TOKENS).logits
            cache = ContiguousKVCache(model.config, 2, TOKENS.shape[1])  # sized for the input alone
            first = model(TOKENS[:, :-1], cache=cache).logits
            step = model(TOKENS[:, -1:], cache=cache, logits_to_keep=1).logits
        assert cache.length == P + TOKENS.shape[1]
        assert (first - full[:, :-1]).abs().max() < 1e-5
        assert (step[:, 0] - full[:, -1]).abs().max() < 1e-5


def test_a_contiguous_cache_grows_keeping_what_it_holds(base_dir):
    model = load_model(base_dir("llama"))
    cache = ContiguousKVCache(model.config, 2, 5)
    with torch.no_grad():
        model(TOKENS[:, :5], cache=cache)
    kept = [k[:, :, :5].clone() for k in cache.keys]
    cache.add_capacity(P)
    assert cache.capacity == 5 + P and cache.keys[0].shape[2] == 5 + P and cache.length == 5
    assert all(torch.equal(k[:, :, :5], before) for k, before in zip(cache.keys, kept, strict=True))
    with pytest.raises(ValueError, match="extra capacity must be >= 0"):
        cache.add_capacity(-1)


def test_text_and_vocabulary_inits_start_from_token_embeddings(base_dir, tmp_path):
    words = [f"w{i}" for i in range(reference_models.VOCAB - 1)]
    backend = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({"<s>": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="w0")
    )
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>").save_pretrained(tmp_path / "tok")
    text = "w5 w17 w3"  # 4 tokens with <s>, repeated up to 6 virtual tokens
    reference = peft.get_peft_model(
        reference_models.build("llama"),
        peft.PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=6,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=str(tmp_path / "tok"),
        ),
    )
    config = PromptTuningConfig(6, "TEXT", text, str(tmp_path / "tok"))
    model = apply_prompt_tuning(load_model(base_dir("llama")), config)
    table = model.prompt_encoder.embedding.weight
    assert torch.equal(table, reference.prompt_encoder.default.embedding.weight)
    assert torch.equal(table, model.embed_tokens.weight[[0, 6, 18, 4, 0, 6]])
    save_prompt_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["prompt_tuning_init"] == "TEXT" and saved["tokenizer_name_or_path"] == str(tmp_path / "tok")
    peft.PeftModel.from_pretrained(reference_models.build("llama"), tmp_path / "adapter")  # PEFT accepts the fields

    sampled = apply_prompt_tuning(load_model(base_dir("llama")), PromptTuningConfig(5, "SAMPLE_VOCAB"))
    embeddings = sampled.embed_tokens.weight
    for row in sampled.prompt_encoder.embedding.weight:
        assert (embeddings == row).all(dim=1).any()


@pytest.mark.parametrize(
    "apply, config, trained",
    [
        (apply_prompt_tuning, PromptTuningConfig(P), ["prompt_encoder.embedding.weight"]),
        (
            apply_prefix_tuning,
            PrefixTuningConfig(P, prefix_projection=True, encoder_hidden_size=16),
            [
                "prompt_encoder.embedding.weight",
                "prompt_encoder.transform.0.weight",
                "prompt_encoder.transform.0.bias",
                "prompt_encoder.transform.2.weight",
                "prompt_encoder.transform.2.bias",
            ],
        ),
    ],
)
def test_the_trainer_moves_only_the_prompt_also_with_gradient_checkpointing(apply, config, trained, base_dir, tmp_path):
    generator = torch.Generator().manual_seed(0)
    data = TokenDataset(torch.randint(3, reference_models.VOCAB, (192,), generator=generator), 12)
    results = []
    for checkpointing in (False, True):
        model = apply(load_model(base_dir("llama")), config)
        randomize(model.prompt_encoder)
        before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        settings = dict(max_steps=3, batch_size=4, lr=1e-2, progress=False, export=False, seed=0, grad_clip=None)
        trainer = Trainer(
            model,
            data,
            TrainConfig(tmp_path / str(checkpointing), gradient_checkpointing=checkpointing, **settings),
        )
        trainer.train()
        after = model.state_dict()
        changed = sorted(name for name in before if not torch.equal(before[name], after[name]))
        assert changed == sorted(trained)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == trained
        assert all("forward" not in vars(block) for block in model.blocks)
        results.append(after)
    for name in trained:
        assert (results[0][name] - results[1][name]).abs().max() < 1e-5, name


def test_bad_input_is_refused_with_a_clear_error(base_dir, tmp_path):
    model = load_model(base_dir("llama"))
    with pytest.raises(PromptLearningError, match="num_virtual_tokens must be an integer >= 1, got 0"):
        PromptTuningConfig(0)
    with pytest.raises(PromptLearningError, match="encoder_reparameterization_type 'GRU'.*MLP, LSTM"):
        PTuningConfig(P, "GRU")
    with pytest.raises(PromptLearningError, match="prompt_tuning_init_text"):
        PromptTuningConfig(P, "TEXT")
    with pytest.raises(PromptLearningError, match="init_weights must be None"):
        PrefixTuningConfig(P, init_weights="ones")
    with pytest.raises(PromptLearningError, match="num_virtual_tokens 256 leaves no room.*256 positions"):
        apply_prompt_tuning(model, PromptTuningConfig(256))
    with pytest.raises(
        PromptLearningError, match="token_dim 64 does not fit this model: its kv heads x head dim is 32"
    ):
        apply_prefix_tuning(model, PrefixTuningConfig(P, token_dim=64))
    with pytest.raises(PromptLearningError, match="takes a PTuningConfig"):
        apply_p_tuning(model, PromptTuningConfig(P))

    wrapped = apply_prompt_tuning(model, PromptTuningConfig(250))
    assert wrapped.config.max_position_embeddings == 6 and model.config.max_position_embeddings == 256
    with pytest.raises(PromptLearningError, match="9 input positions after the 250 virtual ones need 259.*at most 6"):
        wrapped(TOKENS)
    with pytest.raises(PromptLearningError, match="already has a prompt method"):
        apply_prefix_tuning(wrapped, PrefixTuningConfig(P))
    with pytest.raises(
        PromptLearningError, match=r"attention_mask has shape \(2, 254\); expected .* \(2, 4\), without"
    ):
        wrapped(TOKENS[:, :4], attention_mask=torch.ones(2, 254, dtype=torch.long))
    with pytest.raises(PromptLearningError, match="document_ids"):
        wrapped(TOKENS[:, :4], document_ids=torch.zeros(2, 4, dtype=torch.long))

    # An adapter for another model, and one of another kind, say what does not fit.
    prefix = apply_prefix_tuning(load_model(base_dir("llama")), PrefixTuningConfig(P))
    save_prompt_adapter(prefix, tmp_path / "prefix")
    with pytest.raises(PromptLearningError, match="does not fit this model: token_dim 32 .* kv heads x head dim is 64"):
        load_prompt_adapter(load_model(base_dir("gpt2")), tmp_path / "prefix")
    peft.get_peft_model(reference_models.build("llama"), peft.IA3Config(target_modules=["k_proj"])).save_pretrained(
        tmp_path / "ia3"
    )
    with pytest.raises(PromptLearningError, match="'IA3' adapter; load_prompt_adapter loads peft_type 'PROMPT_TUNING'"):
        load_prompt_adapter(load_model(base_dir("llama")), tmp_path / "ia3")


def test_prompt_parameters_stay_float32_on_a_bfloat16_model(base_dir):
    for apply, config in ((apply_p_tuning, PTuningConfig(P)), (apply_prefix_tuning, PrefixTuningConfig(P))):
        model = apply(load_model(base_dir("llama"), dtype="bfloat16"), config)
        assert isinstance(model, PromptTunedModel | PrefixTunedModel)
        assert {p.dtype for p in model.prompt_encoder.parameters()} == {torch.float32}
        assert model(TOKENS).logits.dtype == torch.bfloat16
