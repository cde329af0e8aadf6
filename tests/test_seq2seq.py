"""Encoder-decoder models (T5 v1.0 / v1.1, BART, Marian) against transformers' own, on tiny
random checkpoints built here: logits on padded batches with and without the cache, greedy and
beam `generate` token for token, export that transformers reloads, the CLI, and the refusals
of decoder-only features."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from genforge.checkpoint import load_model, read_generation_config, save_model
from genforge.config import Config, ConfigError
from genforge.generate.beam import BeamOptions
from genforge.generate.decode import decode, decode_stream
from genforge.generate.sampling import SamplingParams
from genforge.model import Transformer, sinusoidal_positions
from genforge.seq2seq import (
    CrossAttention,
    EncoderDecoderTransformer,
    EncoderDecoderUnsupported,
    relative_position_buckets,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96
_BART_SHAPE = dict(
    vocab_size=VOCAB,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=48,
    decoder_ffn_dim=48,
    max_position_embeddings=64,
)
_T5_SHAPE = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_heads=4,
    # Few buckets and a short max distance, so that the test sequences reach the log-spaced
    # buckets and the shared last one.
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
    decoder_start_token_id=0,
)
FAMILIES = {
    "t5": (transformers.T5ForConditionalGeneration, transformers.T5Config, dict(_T5_SHAPE)),
    "t5-v1.1": (
        transformers.T5ForConditionalGeneration,
        transformers.T5Config,
        dict(_T5_SHAPE, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    ),
    "bart": (transformers.BartForConditionalGeneration, transformers.BartConfig, dict(_BART_SHAPE)),
    # Marian as the opus-mt checkpoints are: eos 0, pad (and decoder start) the last id,
    # swish, scaled embeddings.
    "marian": (
        transformers.MarianMTModel,
        transformers.MarianConfig,
        dict(
            _BART_SHAPE,
            pad_token_id=VOCAB - 1,
            eos_token_id=0,
            decoder_start_token_id=VOCAB - 1,
            forced_eos_token_id=0,
            scale_embedding=True,
            activation_function="swish",
        ),
    ),
}


def build_reference(name: str, seed: int = 0, **overrides):
    """A random transformers model of the family, weights drawn wide enough that greedy and beam
    outputs vary, and the end token made likely enough that some sequences end early."""
    model_class, config_class, kwargs = FAMILIES[name]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**kwargs, **overrides}))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
            else:
                parameter.normal_(0, 0.25)
        if name == "t5-v1.1":  # a head of its own, as Flan-T5 checkpoints have
            model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32) * 0.25)
        if hasattr(model, "final_logits_bias"):
            model.final_logits_bias.normal_()
        head = model.get_output_embeddings().weight
        head[model.config.eos_token_id] += 0.1
    return model.eval()


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """name -> (transformers model reloaded from its directory, the directory, genforge model)."""
    built = {}

    def get(name: str):
        if name not in built:
            directory = tmp_path_factory.mktemp(name)
            build_reference(name).save_pretrained(directory)
            model_class = FAMILIES[name][0]
            reference = model_class.from_pretrained(directory).eval()
            built[name] = (reference, directory, load_model(directory))
        return built[name]

    return get


SOURCES = [[5, 9, 17, 22, 31, 40, 7, 3, 12, 44, 50, 61, 19, 8], [11, 12, 13], [30, 31, 32, 33, 34]]


def padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their mask, as a transformers tokenizer pads these models' inputs."""
    longest = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (longest - len(r)) for r in rows])
    mask = (torch.arange(longest)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers_on_padded_batches(family, name):
    reference, _, model = family(name)
    ids, mask = padded(SOURCES, reference.config.pad_token_id)
    decoder_ids, decoder_mask = padded([[4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28], [7, 9, 11], [3] * 6], 1)
    with torch.no_grad():
        want = reference(
            input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask
        ).logits
        got = model(ids, decoder_ids, attention_mask=mask, decoder_attention_mask=decoder_mask).logits
    real = decoder_mask.bool()
    assert (got - want)[real].abs().max() < 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_decoding_gives_the_uncached_logits(family, name):
    # The encoder runs once, into the cache; the decoder then takes a chunk of three tokens
    # and single tokens after it, as generation does.
    reference, _, model = family(name)
    ids, mask = padded(SOURCES, reference.config.pad_token_id)
    decoder_ids = torch.randint(3, VOCAB - 2, (len(SOURCES), 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        cache = model.make_cache(ids, mask, capacity=9)
        pieces = [model(None, decoder_ids[:, :3], cache=cache).logits]
        pieces += [model(None, decoder_ids[:, i : i + 1], cache=cache).logits for i in range(3, 9)]
    assert (torch.cat(pieces, dim=1) - want).abs().max() < 1e-4


def _decode(model, directory, num_beams: int, sources=SOURCES, eos_token_ids=None):
    params = SamplingParams(temperature=0, max_new_tokens=10)
    generation = read_generation_config(directory)
    if num_beams == 1:
        return decode("sample", model, None, sources, params, eos_token_ids=eos_token_ids, generation_config=generation)
    # transformers 5 leaves length_penalty and early_stopping None in the generation config and
    # applies its defaults, 1.0 and False: BeamOptions' own.
    options = BeamOptions(num_beams=num_beams)
    return decode(
        "beam", model, None, sources, params, options, eos_token_ids=eos_token_ids, generation_config=generation
    )


@pytest.mark.parametrize("end", ["config", "mid-sequence"])
@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("name", FAMILIES)
def test_generate_is_token_identical_to_transformers(family, name, num_beams, end):
    # Random tiny models seldom choose their eos; "mid-sequence" makes a token the greedy output
    # reaches midway the end token, so rows end early, at different steps, and beam search's
    # pool of finished hypotheses fills before max_new_tokens.
    reference, directory, model = family(name)
    eos = reference.config.eos_token_id
    if end == "mid-sequence":
        eos = _decode(model, directory, 1)[0].token_ids[3]
    ids, mask = padded(SOURCES, reference.config.pad_token_id)
    with torch.no_grad():
        want = reference.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=10, num_beams=num_beams, eos_token_id=eos
        )
    outputs = _decode(model, directory, num_beams, eos_token_ids=[eos])
    for row, output in zip(want.tolist(), outputs):
        tokens = row[1:]  # after the decoder start token; a finished row is then padded
        if eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        assert output.token_ids == tokens
    if end == "mid-sequence":
        assert len(outputs[0].token_ids) < 10


@pytest.mark.parametrize("name", ["bart", "marian"])
def test_the_end_token_is_forced_at_the_last_step(family, name):
    # BART's and Marian's generation config force eos at the last allowed step, so a row that
    # never chose it still ends with it (transformers' ForcedEOSTokenLogitsProcessor).
    reference, directory, model = family(name)
    eos = reference.config.eos_token_id
    outputs = _decode(model, directory, 1)
    assert any(len(o.token_ids) == 10 and o.token_ids[-1] == eos and eos not in o.token_ids[:-1] for o in outputs)


def test_cross_attention_keys_and_values_are_computed_once_per_input(family, monkeypatch):
    _, directory, model = family("t5")
    calls = []
    original = CrossAttention.keys_values
    monkeypatch.setattr(CrossAttention, "keys_values", lambda self, states: calls.append(1) or original(self, states))
    decode("beam", model, None, SOURCES, SamplingParams(temperature=0, max_new_tokens=8), BeamOptions(num_beams=4))
    assert len(calls) == model.config.num_decoder_layers


@pytest.mark.parametrize("name", FAMILIES)
def test_export_reloads_in_transformers_with_the_same_logits(family, name, tmp_path):
    reference, _, model = family(name)
    save_model(model, tmp_path / "out")
    reloaded = FAMILIES[name][0].from_pretrained(tmp_path / "out").eval()
    ids, mask = padded(SOURCES, reference.config.pad_token_id)
    decoder_ids = torch.tensor([[4, 6, 8, 10]] * len(SOURCES))
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        got = reloaded(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert (got - want).abs().max() < 1e-5
    assert reloaded.generation_config.decoder_start_token_id == reference.generation_config.decoder_start_token_id
    assert load_model(tmp_path / "out").config.to_hf()["is_encoder_decoder"]


def test_t5_with_more_decoder_than_encoder_layers(tmp_path):
    reference = build_reference("t5", num_decoder_layers=3)
    reference.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert (model.config.num_layers, model.config.num_decoder_layers) == (2, 3)
    assert model.config.num_parameters() == sum(p.numel() for p in reference.parameters())
    ids, mask = padded(SOURCES, 0)
    decoder_ids = torch.tensor([[0, 6, 8, 10]] * len(SOURCES))
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        got = model(ids, decoder_ids, attention_mask=mask).logits
    assert (got - want).abs().max() < 1e-4


def test_relative_position_buckets_equal_t5s():
    relative = torch.arange(-200, 201)[None]
    bucket_of = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 12)):
            want = bucket_of(relative, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
            assert torch.equal(relative_position_buckets(relative, bidirectional, buckets, distance), want)


@pytest.mark.parametrize("dim", [32, 7])
def test_sinusoidal_positions_lay_out_marians_table(dim):
    table = transformers.models.marian.modeling_marian.MarianSinusoidalPositionalEmbedding(50, dim).create_weight()
    assert torch.equal(sinusoidal_positions(50, dim), table)


def test_a_decoder_only_model_takes_sinusoidal_positions():
    config = Config(
        family="llama",
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
        position="sinusoidal",
    )
    torch.manual_seed(0)
    model = Transformer(config).eval()
    alone = model(torch.tensor([[5, 6, 7]])).logits
    batch = model(torch.tensor([[0, 0, 5, 6, 7]]), attention_mask=torch.tensor([[0, 0, 1, 1, 1]])).logits
    assert (batch[:, 2:] - alone).abs().max() < 1e-5
    moved = model(torch.tensor([[5, 6, 7]]), position_ids=torch.tensor([[3, 4, 5]])).logits
    assert (moved - alone).abs().max() > 1e-3  # the positions are there
    with pytest.raises(ValueError, match="beyond this model's 32 sinusoidal positions"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ConfigError, match="no Hugging Face counterpart"):
        config.to_hf()
    with pytest.raises(ConfigError, match="encoder-decoder models only"):
        Config(**{**config.to_dict(), "position": "relative"})


@pytest.mark.parametrize("strategy", ["speculative", "prompt-lookup", "contrastive", "contrastive-decoding"])
def test_decoder_only_strategies_refuse_an_encoder_decoder_model(family, strategy):
    _, _, model = family("t5")
    with pytest.raises(EncoderDecoderUnsupported, match=f"strategy '{strategy}' needs a decoder-only model.*t5"):
        decode(strategy, model, None, [SOURCES[0]], SamplingParams(temperature=0, max_new_tokens=4))


def test_the_serving_engine_refuses_an_encoder_decoder_model(family):
    from genforge.serve.api import app_from_directories
    from genforge.serve.engine import Engine

    _, directory, model = family("bart")
    with pytest.raises(EncoderDecoderUnsupported, match="the serving engine needs a decoder-only model"):
        Engine(model)
    with pytest.raises(EncoderDecoderUnsupported, match="serving model 'm' needs a decoder-only model"):
        app_from_directories({"m": str(directory)})


def test_early_exit_and_tensor_parallelism_refuse_an_encoder_decoder_model(family):
    from genforge.early_exit import early_exit_generate
    from genforge.train.tensor_parallel import check_tensor_parallel

    _, _, model = family("t5")
    with pytest.raises(EncoderDecoderUnsupported, match="early exit needs a decoder-only model"):
        early_exit_generate(model, [5, 6, 7], 2, 0.5)
    with pytest.raises(EncoderDecoderUnsupported, match="tensor parallelism needs a decoder-only model"):
        check_tensor_parallel(model.config, 1)


def test_streamed_sampling_is_seeded_and_stops_where_decode_does(family):
    _, directory, model = family("marian")
    params = SamplingParams(temperature=0.8, top_k=20, seed=3, max_new_tokens=8)
    generation = read_generation_config(directory)
    decoded = decode("sample", model, None, SOURCES, params, generation_config=generation)
    streamed = [[] for _ in SOURCES]
    for event in decode_stream("sample", model, None, SOURCES, params, generation_config=generation):
        streamed[event.row].append(event.token_id)
    assert streamed == [d.token_ids for d in decoded]
    assert all(tokens[-1] == 0 for tokens in streamed)  # Marian's eos, forced at the last step at the latest


def _word_tokenizer():
    """A word-level tokenizer over the T5 test vocabulary that appends </s>, as T5's does."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    from genforge.tokenizer import Tokenizer

    words = ["<pad>", "</s>", "<unk>", "translate", "English", "to", "German", ":", "hello", "world"]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    backend.add_special_tokens(["<pad>", "</s>", "<unk>"])
    return Tokenizer(backend, {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"})


@pytest.mark.parametrize("strategy", ["sample", "beam"])
def test_generate_cli_translates_with_a_t5_directory(family, tmp_path, capsys, strategy):
    from genforge.cli import main

    reference, directory, model = family("t5")
    tokenizer = _word_tokenizer()
    save_model(model, tmp_path / "t5", tokenizer=tokenizer)
    prompt = "translate English to German: hello world"
    ids = torch.tensor([tokenizer.encode(prompt)])
    assert ids[0, -1] == 1  # the prompt ends with </s>, as T5 was trained
    with torch.no_grad():
        want = reference.generate(input_ids=ids, max_new_tokens=6, num_beams=1 if strategy == "sample" else 3)
    flags = ["--temperature", "0"] if strategy == "sample" else ["--strategy", "beam", "--num-beams", "3"]
    status = main(["generate", "--model", str(tmp_path / "t5"), "--prompt", prompt, "--max-new-tokens", "6", *flags])
    assert status == 0
    text = tokenizer.decode(want[0].tolist(), skip_special_tokens=True).strip()
    assert text and capsys.readouterr().out.strip() == text


def test_generate_cli_refuses_speculative_decoding_before_loading(family, capsys):
    from genforge.cli import main

    _, directory, _ = family("t5")
    status = main(["generate", "--model", str(directory), "--prompt", "x", "--strategy", "speculative", "--draft", "d"])
    assert status == 2
    assert "strategy 'speculative' needs a decoder-only model" in capsys.readouterr().err


def test_bad_encoder_decoder_configs_are_refused():
    bart = FAMILIES["bart"][2]
    with pytest.raises(ConfigError, match="encoder_attention_heads=4 but decoder_attention_heads=2"):
        Config.from_hf({**bart, "model_type": "bart", "decoder_attention_heads": 2})
    with pytest.raises(ConfigError, match="separate source and target vocabularies"):
        Config.from_hf({**bart, "model_type": "marian", "share_encoder_decoder_embeddings": False})
    config = Config.from_hf({**bart, "model_type": "bart"})
    with pytest.raises(ValueError, match="not an encoder-decoder config"):
        EncoderDecoderTransformer(Config(**{**config.to_dict(), "encoder_decoder": False, "position": "learned"}))
    model = EncoderDecoderTransformer(config)
    with pytest.raises(ValueError, match="beyond this model's 64 learned positions"):
        model(torch.zeros(1, 65, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))
    assert json.loads(json.dumps(config.to_hf()))["architectures"] == ["BartForConditionalGeneration"]
