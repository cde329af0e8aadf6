"""Masked-LM pretraining of the BERT encoder: the 80/10/10 corruption against transformers'
DataCollatorForLanguageModeling (same draws, and the expected statistics), the loss against
BertForMaskedLM's, the head's logits and export against BertForMaskedLM, and the Trainer
learning, resuming exactly and refusing what it cannot train."""

import copy
import functools
import json

import factories
import pytest
import torch
import transformers

from genforge.checkpoint import load_model, save_model
from genforge.config import Config
from genforge.model import Transformer
from genforge.train import TokenDataset, TrainConfig, Trainer, TrainError
from genforge.train.losses import IGNORE_INDEX, mask_tokens, masked_lm_loss

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, MASK, SPECIALS = 96, 4, (0, 1, 2, 3, 4)  # ids 0-4 play [PAD] [UNK] [CLS] [SEP] [MASK]


def hf_bert_mlm(seed=0, tie=True):
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=112,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(config)
    with torch.no_grad():  # move norms and biases off their init so a wrong mapping shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


# The encoder of factories.py over this file's vocabulary, with BERT's norm epsilon and [PAD] id.
tiny_encoder = functools.partial(factories.tiny_encoder, vocab_size=VOCAB, norm_eps=1e-12, pad_token_id=0)


# ----------------------------------------------------------------------------- masking
def test_masking_draws_exactly_what_the_transformers_collator_draws():
    from genforge.encoder import default_encoder_path

    tokenizer = transformers.BertTokenizerFast.from_pretrained(default_encoder_path())
    texts = ["the quick brown fox jumps over the lazy dog", "masked language models read both ways at once"] * 8
    encoded = tokenizer(texts, padding=True, return_tensors="pt", return_special_tokens_mask=True)
    ids = encoded["input_ids"]
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.3)
    collator.generator = torch.Generator().manual_seed(11)
    expected_inputs, expected_labels = collator.torch_mask_tokens(ids.clone(), encoded["special_tokens_mask"])
    inputs, labels = mask_tokens(
        ids, tokenizer.mask_token_id, len(tokenizer), 0.3, tokenizer.all_special_ids, torch.Generator().manual_seed(11)
    )
    assert torch.equal(inputs, expected_inputs)
    assert torch.equal(labels, expected_labels)
    assert int((labels != IGNORE_INDEX).sum()) > 0


def test_masking_follows_the_80_10_10_rule():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (64, 512), generator=generator)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    original = ids.clone()
    inputs, labels = mask_tokens(ids, MASK, VOCAB, 0.15, SPECIALS, torch.Generator().manual_seed(1))
    assert torch.equal(ids, original)  # the input is not modified
    chosen = labels != IGNORE_INDEX
    assert torch.equal(labels[chosen], ids[chosen])  # labels are the original ids where chosen
    assert not chosen[:, [0, -1]].any()  # special tokens are never chosen
    n = int(chosen.sum())
    eligible = ids.numel() - 2 * ids.shape[0]
    assert n / eligible == pytest.approx(0.15, abs=0.005)
    masked = (inputs == MASK) & chosen
    kept = (inputs == ids) & chosen
    replaced = chosen & ~masked & ~kept
    assert masked.sum() / n == pytest.approx(0.8, abs=0.015)
    # A random replacement equal to the original id (1 in 96) counts as kept.
    assert replaced.sum() / n == pytest.approx(0.1 * (1 - 1 / VOCAB), abs=0.01)
    assert kept.sum() / n == pytest.approx(0.1 + 0.1 / VOCAB, abs=0.01)
    assert torch.equal(inputs[~chosen], ids[~chosen])  # unchosen positions are untouched
    assert int(inputs.max()) < VOCAB


def test_masking_rejects_bad_settings():
    ids = torch.randint(5, VOCAB, (2, 8))
    with pytest.raises(ValueError, match="mlm_probability"):
        mask_tokens(ids, MASK, VOCAB, 1.5)
    with pytest.raises(ValueError, match="mask_token_id"):
        mask_tokens(ids, VOCAB, VOCAB)
    with pytest.raises(ValueError, match="int64"):
        mask_tokens(ids.float(), MASK, VOCAB)
    with pytest.raises(ValueError, match="sum to at most 1"):
        mask_tokens(ids, MASK, VOCAB, mask_replace_prob=0.95, random_replace_prob=0.1)


# --------------------------------------------------------------------------- head and loss
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    model = hf_bert_mlm()
    directory = tmp_path_factory.mktemp("bert-mlm")
    model.save_pretrained(directory)
    return model, directory


def test_head_loads_bert_for_masked_lm_and_matches_its_logits_and_loss(bert_dir):
    reference, directory = bert_dir
    ours = load_model(directory)
    assert ours.config.masked_lm_head and ours.lm_transform is not None
    ids = torch.randint(5, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    inputs, labels = mask_tokens(ids, MASK, VOCAB, 0.3, SPECIALS, torch.Generator().manual_seed(3))
    labels[mask == 0] = IGNORE_INDEX  # padding is never a target (its hidden states are not defined alike)
    with torch.no_grad():
        expected = reference(input_ids=inputs, attention_mask=mask, labels=labels)
        logits = ours(inputs, attention_mask=mask).logits
    real = mask.bool()
    assert float((logits - expected.logits)[real].abs().max()) <= 1e-4
    assert float(masked_lm_loss(logits, labels)) == pytest.approx(float(expected.loss), abs=1e-5)


def test_untied_head_round_trips(tmp_path):
    reference = hf_bert_mlm(seed=1, tie=False)
    reference.save_pretrained(tmp_path / "in")
    ours = load_model(tmp_path / "in")
    assert ours.lm_head.weight.data_ptr() != ours.embed_tokens.weight.data_ptr()
    save_model(ours, tmp_path / "out")
    again = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(5, VOCAB, (2, 10))
    with torch.no_grad():
        assert float((again(ids).logits - reference(ids).logits).abs().max()) <= 1e-5


def test_headless_encoder_stays_headless(tmp_path):
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=112,
        max_position_embeddings=64,
    )
    transformers.BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "base")
    model = load_model(tmp_path / "base")
    assert model.lm_head is None and model.lm_transform is None and model(torch.tensor([[5, 6]])).logits is None
    save_model(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["BertModel"]
    assert load_model(tmp_path / "out").lm_head is None


def test_masked_lm_loss_checks_shapes():
    with pytest.raises(ValueError, match="logits must be"):
        masked_lm_loss(torch.zeros(2, 3, VOCAB), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="causal model"):
        Config(
            family="bert",
            vocab_size=8,
            hidden_size=8,
            num_layers=1,
            num_heads=2,
            intermediate_size=8,
            masked_lm_head=True,
        )


# ----------------------------------------------------------------------------- training
def make_trainer(out_dir, model=None, **overrides):
    settings = dict(
        out_dir=out_dir,
        max_steps=4,
        batch_size=4,
        lr=3e-3,
        warmup_steps=1,
        seed=2,
        progress=False,
        eval_every=2,
        eval_batches=2,
        export=False,
        mask_token_id=MASK,
        special_token_ids=SPECIALS,
    )
    settings.update(overrides)
    pattern = torch.arange(5, 5 + 16)
    return Trainer(
        model if model is not None else tiny_encoder(),
        TokenDataset(pattern.repeat(24), 16),
        TrainConfig(**settings),
        val_data=TokenDataset(pattern.repeat(4), 16),
    )


def test_trainer_pretrains_the_encoder_and_exports_bert_for_masked_lm(tmp_path):
    trainer = make_trainer(
        tmp_path, max_steps=40, lr=1e-2, warmup_steps=4, eval_every=20, mlm_probability=0.3, export=True
    )
    result = trainer.train()
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.3 * first, (first, last)
    assert result.evals[-1]["val_loss"] < 0.3 * result.evals[0]["val_loss"] + 1.0
    reference = transformers.AutoModelForMaskedLM.from_pretrained(result.export_dir).eval()
    assert type(reference).__name__ == "BertForMaskedLM"
    ids = torch.arange(5, 21).view(1, 16)
    trainer.model.eval()
    with torch.no_grad():
        assert float((trainer.model(ids).logits - reference(ids).logits).abs().max()) <= 1e-4


def test_masked_lm_resume_is_exact(tmp_path):
    base = tiny_encoder()
    straight = make_trainer(tmp_path / "straight", model=copy.deepcopy(base), save_every=2)
    straight.train()
    stopped = make_trainer(tmp_path / "split", model=copy.deepcopy(base), save_every=2)

    class Stop(Exception):
        pass

    def stop(step, path):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        stopped.train(on_checkpoint=stop)
    resumed = make_trainer(tmp_path / "split", model=tiny_encoder(seed=9), save_every=2)
    resumed.train(resume=True)
    curve = lambda trainer: [(r["step"], r.get("loss"), r.get("val_loss")) for r in trainer.read_metrics()]  # noqa: E731
    assert curve(resumed) == curve(straight)  # bit-identical floats, masks included
    for name, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    with pytest.raises(TrainError, match="mlm_probability"):
        make_trainer(tmp_path / "split", max_steps=6, mlm_probability=0.2).train(resume=True)


def test_trainer_refuses_an_encoder_it_cannot_train(tmp_path):
    headless = Transformer(
        Config(
            family="bert",
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=1,
            num_heads=4,
            intermediate_size=48,
            causal=False,
            position="learned",
            type_vocab_size=2,
        )
    )
    with pytest.raises(TrainError, match="no masked-LM head"):
        make_trainer(tmp_path, model=headless)
    with pytest.raises(TrainError, match=r"\[MASK\] id"):
        make_trainer(tmp_path, mask_token_id=None)
    with pytest.raises(TrainError, match="below vocab_size"):
        make_trainer(tmp_path, mask_token_id=VOCAB)
    assert not (tmp_path / "checkpoints").exists()
