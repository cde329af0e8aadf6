"""genforge.safety.membership and `genforge safety mia`: the ROC summary against scikit-learn,
LiRA's likelihood ratio against its formula, per-sequence losses against a direct computation,
and the attacks end to end on a tiny model overfit on a handful of sentences."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from factories import tiny_model
from scipy import stats
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from genforge.safety import privacy_cli
from genforge.safety.membership import (
    MembershipError,
    area_under_curve,
    evaluate_attack,
    lira_scores,
    logit_confidence,
    loss_attack_scores,
    plot_roc,
    read_texts,
    reference_attack_scores,
    roc_curve,
    sequence_losses,
    tpr_at_fpr,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_roc_and_auc_equal_scikit_learn_with_ties():
    generator = np.random.default_rng(0)
    labels = generator.random(300) < 0.4
    scores = np.round(generator.normal(labels * 0.8, 1.0), 1)  # rounding makes ties
    fpr, tpr = roc_curve(scores, labels)
    assert area_under_curve(fpr, tpr) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    reference_fpr, reference_tpr, _ = sklearn_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, reference_fpr)
    np.testing.assert_allclose(tpr, reference_tpr)
    result = evaluate_attack("x", scores, labels)
    assert result.members == labels.sum() and result.non_members == (~labels).sum()
    allowed = reference_fpr <= 0.01
    assert result.tpr_at_1pct_fpr == pytest.approx(reference_tpr[allowed].max())


def test_tpr_at_low_fpr_and_bad_input():
    scores = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0])
    labels = np.array([True, False, True, True, False, False])
    fpr, tpr = roc_curve(scores, labels)
    assert tpr_at_fpr(fpr, tpr, 0.01) == pytest.approx(1 / 3)  # above the first non-member only one member
    assert tpr_at_fpr(fpr, tpr, 0.34) == pytest.approx(1.0)
    assert area_under_curve(*roc_curve(-scores, labels)) == pytest.approx(1 - area_under_curve(fpr, tpr))
    with pytest.raises(MembershipError, match="members and non-members"):
        roc_curve(scores, np.ones(6, dtype=bool))
    with pytest.raises(MembershipError, match="1-D"):
        roc_curve(scores, labels[:3])


def test_attack_scores():
    losses, reference = np.array([0.5, 2.0, 1.0]), np.array([[1.0, 2.0, 3.0], [1.0, 2.2, 2.6]])
    np.testing.assert_allclose(loss_attack_scores(losses), [-0.5, -2.0, -1.0])
    np.testing.assert_allclose(reference_attack_scores(losses, reference), [0.5, 0.1, 1.8])
    p = np.exp(-losses)
    np.testing.assert_allclose(logit_confidence(losses), np.log(p / (1 - p)))


def test_lira_online_and_offline_follow_their_formulas():
    generator = np.random.default_rng(1)
    shadows, examples = 6, 5
    inside = np.zeros((shadows, examples), dtype=bool)
    inside[::2] = True  # shadows 0, 2, 4 trained on every example
    statistic = generator.normal(np.where(inside, 2.0, 0.0), 0.5)
    losses = -np.log(1 / (1 + np.exp(-statistic)))  # invert logit_confidence
    target_stat = np.array([2.1, -0.2, 1.0, 3.0, 0.1])
    target = -np.log(1 / (1 + np.exp(-target_stat)))
    scores = lira_scores(target, losses, inside, global_variance=False)
    stat = logit_confidence(losses)
    for j in range(examples):
        s_in, s_out = stat[inside[:, j], j], stat[~inside[:, j], j]
        expected = stats.norm.logpdf(target_stat[j], s_in.mean(), s_in.std()) - stats.norm.logpdf(
            target_stat[j], s_out.mean(), s_out.std()
        )
        assert scores[j] == pytest.approx(expected, rel=1e-6)
    offline = lira_scores(target, losses[1::2])  # OUT shadows only
    residuals = stat[1::2] - stat[1::2].mean(axis=0)
    expected = stats.norm.logcdf((target_stat - stat[1::2].mean(axis=0)) / residuals.std())
    np.testing.assert_allclose(offline, expected, rtol=1e-6)
    with pytest.raises(MembershipError, match="IN at least one"):
        lira_scores(target, losses, np.zeros_like(inside))


def test_sequence_losses_of_different_lengths():
    model = tiny_model(seed=2)
    sequences = [torch.randint(0, 64, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 12, 2)]
    losses = sequence_losses(model, sequences, batch_size=2)
    for sequence, loss in zip(sequences, losses):
        ids = torch.tensor([sequence])
        with torch.no_grad():
            logits = model(ids).logits
        expected = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
        assert loss == pytest.approx(expected, abs=1e-5)
    with pytest.raises(MembershipError, match="fewer than 2 tokens"):
        sequence_losses(model, [[1]])
    with pytest.raises(MembershipError, match="more than the model's 64 positions"):
        sequence_losses(model, [list(range(10)) * 7])


MEMBERS = [
    "the heron waits by the grey lake at dawn",
    "seven copper kettles hang above the stove",
    "a quiet train crosses the northern bridge",
    "my neighbour paints blue doors every spring",
    "the library closes early on winter fridays",
    "old maps fold badly along the coastline",
    "two foxes argued over a lost sandwich",
    "rain taps the tin roof of the garden shed",
]
NON_MEMBERS = [
    "the baker sings while the bread is rising",
    "a paper boat drifts past the fishing pier",
    "snow covered the bicycles near the station",
    "the clock tower chimes a minute too late",
    "green lanterns line the path to the temple",
    "an owl watched the farmer mend the fence",
    "the ferry leaves at noon for the island",
    "candles flicker in the old stone chapel",
]


def _trained_dir(tmp_path, base, texts, name, steps):
    """The tiny chat model in `base` fitted on `texts` for `steps` full-batch Adam steps, saved with its tokenizer."""
    from genforge.checkpoint import load_model, save_model
    from genforge.tokenizer import Tokenizer

    tokenizer, model = Tokenizer.from_dir(base), load_model(base, dtype=torch.float32)
    ids = tokenizer.encode_batch(texts)
    width = max(len(x) for x in ids)
    inputs = torch.tensor([x + [0] * (width - len(x)) for x in ids])
    labels = torch.tensor([x + [-100] * (width - len(x)) for x in ids])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_model(model, tmp_path / name, tokenizer)
    return tmp_path / name


@pytest.mark.slow
def test_safety_mia_command_end_to_end(tmp_path, capsys):
    from finetune_shared import tiny_chat_model_dir

    base = tiny_chat_model_dir(tmp_path / "base")
    target = _trained_dir(tmp_path, base, MEMBERS, "target", steps=40)
    references = [_trained_dir(tmp_path, base, [t[::-1] for t in MEMBERS[i::2]], f"ref{i}", 5) for i in (0, 1)]
    (tmp_path / "members.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in MEMBERS))
    (tmp_path / "non_members.txt").write_text("\n".join(NON_MEMBERS) + "\n\n")
    parser = argparse.ArgumentParser()
    privacy_cli.add_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            str(target),
            "--members",
            str(tmp_path / "members.jsonl"),
            "--non-members",
            str(tmp_path / "non_members.txt"),
            "--reference",
            *map(str, references),
            "--plot",
            str(tmp_path / "roc.png"),
            "--json",
            str(tmp_path / "mia.json"),
        ]
    )
    assert privacy_cli.run(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(printed) == {"loss", "reference", "lira_offline"}
    assert printed["loss"]["auc"] == 1.0 and printed["loss"]["tpr_at_1pct_fpr"] == 1.0  # 40 steps on 8 lines
    assert printed["loss"]["members"] == 8 and printed["loss"]["non_members"] == 8
    assert json.loads((tmp_path / "mia.json").read_text()) == printed
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(MembershipError, match="no string field 'body'"):
        read_texts(tmp_path / "members.jsonl", text_field="body")
    with pytest.raises(MembershipError, match="does not exist"):
        read_texts(tmp_path / "absent.txt")


def test_plot_roc_writes_a_png(tmp_path):
    labels = np.r_[np.ones(20, dtype=bool), np.zeros(20, dtype=bool)]
    result = evaluate_attack("loss", np.r_[np.arange(20) + 5.0, np.arange(20)], labels)
    path = plot_roc({"overfit": result}, tmp_path / "roc.png")
    assert path.stat().st_size > 1000
