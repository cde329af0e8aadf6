"""The reward model against transformers' sequence classifiers, both ways, on padded batches."""

from __future__ import annotations

import pytest
import torch
import transformers
from factories import tiny_model
from reference_models import FAMILIES

from genforge.align.losses import reward_model_loss
from genforge.align.reward import RewardModel, last_token_index, pairwise_accuracy, score_sequences
from genforge.checkpoint import CheckpointError, load_model, save_model

PAD = 0


def _hf_classifier(family: str, seed: int = 0):
    """A tiny random transformers `...ForSequenceClassification` with one label and a pad id."""
    config_class, kwargs = FAMILIES[family]
    config = config_class(**kwargs, num_labels=1, pad_token_id=PAD)
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms at 1 and biases at 0 would hide a wrong mapping
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _padded(lengths: list[int], left: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        span = slice(width - length, width) if left else slice(0, length)
        input_ids[row, span] = torch.randint(3, 90, (length,), generator=generator)
        attention[row, span] = 1
    return input_ids, attention


def _hf_scores(model, input_ids, attention) -> torch.Tensor:
    # transformers counts positions from 0 at the row's first slot; a left-padded row needs
    # them from its first real token, as genforge counts them.
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids, attention_mask=attention, position_ids=positions).logits.squeeze(-1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_transformers_reward_checkpoint_scores_equal(family, tmp_path):
    reference = _hf_classifier(family)
    reference.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ours = RewardModel.from_pretrained(tmp_path / "hf")
    assert ours.decoder.lm_head is None
    for left in (False, True):
        input_ids, attention = _padded([7, 3, 11, 1], left=left)
        with torch.no_grad():
            torch.testing.assert_close(
                ours(input_ids, attention), _hf_scores(reference, input_ids, attention), atol=1e-5, rtol=1e-5
            )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_saved_reward_model_loads_in_transformers_and_back(family, tmp_path):
    ours = RewardModel.from_pretrained(_save_hf(family, tmp_path))
    ours.save_pretrained(tmp_path / "ours")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours").eval()
    again = RewardModel.from_pretrained(tmp_path / "ours")
    input_ids, attention = _padded([5, 9, 2], left=False, seed=1)
    with torch.no_grad():
        scores = ours(input_ids, attention)
        torch.testing.assert_close(_hf_scores(theirs, input_ids, attention), scores, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again(input_ids, attention), scores, atol=0, rtol=0)
    assert theirs.config.num_labels == 1


def _save_hf(family: str, tmp_path) -> str:
    directory = tmp_path / f"hf-{family}"
    _hf_classifier(family).save_pretrained(directory, safe_serialization=True)
    return directory


def test_reward_read_at_the_last_real_token_whatever_the_padding():
    model = RewardModel(tiny_model(seed=3, pad_token_id=PAD)).eval()
    sequences = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16]]
    alone = torch.cat([score_sequences(model, [s]) for s in sequences])
    torch.testing.assert_close(score_sequences(model, sequences), alone, atol=1e-5, rtol=1e-5)
    left_ids, left_mask = torch.full((3, 6), PAD), torch.zeros(3, 6, dtype=torch.long)
    for row, sequence in enumerate(sequences):
        left_ids[row, 6 - len(sequence) :], left_mask[row, 6 - len(sequence) :] = torch.tensor(sequence), 1
    with torch.no_grad():
        torch.testing.assert_close(model(left_ids, left_mask), alone, atol=1e-5, rtol=1e-5)
    # transformers' rule: a trailing pad-id token (pad = eos) is not the one read.
    assert last_token_index(torch.tensor([[4, 5, PAD, PAD]]), torch.tensor([[1, 1, 1, 0]]), PAD).tolist() == [1]


def test_pairwise_accuracy_counts_the_pairs_ranked_right_and_training_raises_it():
    torch.manual_seed(4)
    model = RewardModel(tiny_model(seed=4, pad_token_id=PAD))
    # Chosen completions end in token 7, rejected ones in token 8: learnable from the last token.
    prompts = [[3 + i % 5, 10 + i % 7] for i in range(16)]
    pairs = [(p + [20 + i % 3, 7], p + [20 + i % 3, 8]) for i, p in enumerate(prompts)]
    model.eval()
    before = pairwise_accuracy(model, pairs, batch_size=5)
    chosen, rejected = score_sequences(model, [c for c, _ in pairs]), score_sequences(model, [r for _, r in pairs])
    assert before.accuracy == pytest.approx(float((chosen > rejected).float().mean()))
    assert before.mean_margin == pytest.approx(float((chosen - rejected).mean()), abs=1e-6)
    assert before.pairs == 16
    assert before.accuracy < 0.5  # measured: 0.0 for this seed
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    both = torch.tensor([c for c, _ in pairs] + [r for _, r in pairs])  # all equal length: no padding
    for _ in range(4):
        rewards = model(both)
        loss = reward_model_loss(rewards[:16], rewards[16:]).losses.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert pairwise_accuracy(model, pairs).accuracy == 1.0


def test_bad_checkpoints_and_inputs_are_refused(tmp_path):
    save_model(tiny_model(), tmp_path / "lm")
    with pytest.raises(CheckpointError, match="lacks 1 tensor.*score.weight"):
        RewardModel.from_pretrained(tmp_path / "lm")
    classifier = _save_hf("llama", tmp_path)
    with pytest.raises(CheckpointError, match="RewardModel.from_pretrained"):
        load_model(classifier)
    config_class, kwargs = FAMILIES["llama"]
    two_labels = transformers.AutoModelForSequenceClassification.from_config(config_class(**kwargs, num_labels=2))
    two_labels.save_pretrained(tmp_path / "two", safe_serialization=True)
    with pytest.raises(CheckpointError, match="2 outputs"):
        RewardModel.from_pretrained(tmp_path / "two")
    model = RewardModel(tiny_model(pad_token_id=PAD))
    with pytest.raises(ValueError, match="row 1 has no token"):
        model(torch.tensor([[5, 6], [PAD, PAD]]), torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match="sequence 0 is empty"):
        score_sequences(model, [[]])
