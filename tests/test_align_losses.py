"""genforge's alignment losses against TRL's own loss code on the same random tensors.

TRL 1.16 computes most losses inside its trainers' `_compute_loss` methods, next to the model
call. Those methods are called here unbound, with a stand-in `self` carrying only the
attributes they read and a stand-in model that returns the per-token log-probabilities the
test made up (masked like a real batch: prompts of different lengths, right padding). So the
code under comparison is TRL's, line for line, without building a trainer:

- DPO sigmoid / hinge / IPO / robust: `DPOTrainer._compute_loss`, one call per example (its
  per-sequence losses are averaged inside) and one for the whole batch.
- Conservative DPO: TRL 1.16's DPO sigmoid no longer reads label_smoothing; the same formula
  is `CPOTrainer.cpo_loss` ("sigmoid", label_smoothing) fed the log-ratios in place of the
  log-probabilities (CPO is DPO with the reference dropped), checked there and against the
  formula of Mitchell (2023).
- KTO: `KTOTrainer._compute_loss` (with its own `_compute_kl_logps`), ORPO:
  `ORPOTrainer.odds_ratio_loss`, SimPO: `CPOTrainer.cpo_loss` with loss_type "simpo",
  GRPO: `GRPOTrainer._compute_loss`, reward model: `RewardTrainer.compute_loss`.
"""

from __future__ import annotations

import contextlib
import os
import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from genforge.align.losses import (
    dpo_loss,
    grpo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    reward_model_loss,
    simpo_loss,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live in trl.experimental
pytest.importorskip("trl")
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.kto_trainer import KTOTrainer
from trl.trainer.reward_trainer import RewardTrainer

TOLERANCE = dict(atol=1e-6, rtol=1e-6)
BATCH, SEQ = 6, 12


# ------------------------------------------------------------------------------ stand-ins
class _Accelerator:
    """What TRL's loss code asks of accelerate's Accelerator, on one CPU process."""

    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def autocast(self):
        return contextlib.nullcontext()


def _trainer(**attributes) -> SimpleNamespace:
    return SimpleNamespace(
        accelerator=_Accelerator(),
        model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        aux_loss_enabled=False,
        **attributes,
    )


class _LogProbModel:
    """Stands in for a transformers model called with `fused_lm_head=True`: returns the
    per-token log-probabilities registered for the `input_ids` tensor it is given."""

    def __init__(self) -> None:
        self.outputs: dict[int, torch.Tensor] = {}

    def register(self, input_ids: torch.Tensor, shifted_logps: torch.Tensor) -> None:
        self.outputs[id(input_ids)] = shifted_logps

    def __call__(self, input_ids, labels=None, **kwargs):
        logps = self.outputs[id(input_ids)]
        zeros = torch.zeros_like(logps)
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def _completion_batch(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random right-padded rows: a prompt of 1-4 tokens, a completion of 1-6, then padding.
    Returns input_ids, attention_mask, completion_mask (rows, SEQ) and the per-token
    log-probabilities of the completion tokens (rows, SEQ - 1), aligned as TRL's are (column
    t scores token t + 1), zero elsewhere."""
    generator = torch.Generator().manual_seed(seed)
    attention = torch.zeros(rows, SEQ, dtype=torch.long)
    completion = torch.zeros(rows, SEQ, dtype=torch.long)
    for row in range(rows):
        prompt = int(torch.randint(1, 5, (), generator=generator))
        answer = int(torch.randint(1, 7, (), generator=generator))
        attention[row, : prompt + answer] = 1
        completion[row, prompt : prompt + answer] = 1
    input_ids = torch.randint(3, 50, (rows, SEQ), generator=generator) * attention
    logps = -torch.rand(rows, SEQ - 1, generator=generator, dtype=torch.float64) * 3
    return input_ids, attention, completion, (logps * completion[:, 1:]).float()


def _random(shape, seed: int, scale: float = 5.0) -> torch.Tensor:
    return -torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * scale


# -------------------------------------------------------------------------------------- DPO
def _trl_dpo(input_ids, attention, completion, shifted_logps, ref_chosen, ref_rejected, **settings) -> tuple:
    """TRL's DPO loss and its logged rewards for one batch laid out [chosen; rejected]."""
    trainer = _trainer(
        beta=settings.get("beta", 0.1),
        loss_types=[settings.get("loss_type", "sigmoid")],
        loss_weights=[1.0],
        label_smoothing=settings.get("label_smoothing", 0.0),
        f_divergence_type="reverse_kl",
        ld_alpha=None,
        precompute_ref_logps=True,
        use_weighting=False,
        args=SimpleNamespace(),
    )
    model = _LogProbModel()
    model.register(input_ids, shifted_logps)
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]
    return loss, metrics["rewards/chosen"][-1], metrics["rewards/rejected"][-1]


@pytest.mark.parametrize(
    "loss_type, beta, label_smoothing",
    [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("hinge", 0.3, 0.0), ("ipo", 0.2, 0.0), ("robust", 0.1, 0.2)],
)
def test_dpo_family_equals_trl(loss_type, beta, label_smoothing):
    input_ids, attention, completion, shifted = _completion_batch(2 * BATCH, seed=1)
    policy = shifted.sum(-1)
    counts = completion.sum(-1)
    reference = policy + torch.randn(2 * BATCH, generator=torch.Generator().manual_seed(2))
    ours = dpo_loss(
        policy[:BATCH],
        policy[BATCH:],
        reference[:BATCH],
        reference[BATCH:],
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        chosen_lengths=counts[:BATCH],
        rejected_lengths=counts[BATCH:],
    )
    settings = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    for i in range(BATCH):
        rows = [i, BATCH + i]
        loss, chosen_reward, rejected_reward = _trl_dpo(
            input_ids[rows], attention[rows], completion[rows], shifted[rows], reference[[i]], reference[[BATCH + i]],
            **settings,
        )  # fmt: skip
        torch.testing.assert_close(ours.losses[i], loss, **TOLERANCE)
        assert ours.chosen_rewards[i].item() == pytest.approx(chosen_reward, abs=1e-6)
        assert ours.rejected_rewards[i].item() == pytest.approx(rejected_reward, abs=1e-6)
    whole, _, _ = _trl_dpo(input_ids, attention, completion, shifted, reference[:BATCH], reference[BATCH:], **settings)
    torch.testing.assert_close(ours.losses.mean(), whole, **TOLERANCE)


def test_conservative_dpo_equals_trl_cpo_sigmoid_on_log_ratios_and_the_formula():
    policy_chosen, policy_rejected = _random(BATCH, 3), _random(BATCH, 4)
    reference_chosen, reference_rejected = _random(BATCH, 5), _random(BATCH, 6)
    beta, smoothing = 0.3, 0.15
    ours = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta, "sigmoid", smoothing)
    chosen_ratio, rejected_ratio = policy_chosen - reference_chosen, policy_rejected - reference_rejected
    trainer = _trainer(alpha=0.0, loss_type="sigmoid", beta=beta, label_smoothing=smoothing)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen_ratio, rejected_ratio)
    torch.testing.assert_close(ours.losses, losses, **TOLERANCE)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, **TOLERANCE)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, **TOLERANCE)
    margin = beta * (chosen_ratio - rejected_ratio)
    formula = -(1 - smoothing) * F.logsigmoid(margin) - smoothing * F.logsigmoid(-margin)
    torch.testing.assert_close(ours.losses, formula, **TOLERANCE)


def test_dpo_gradient_is_the_closed_form():
    """d loss_i / d log pi(y_w) = -beta sigmoid(-beta h_i) and the opposite for y_l, where h_i
    is the margin of log-ratios (Rafailov et al. 2023, section 4)."""
    beta = 0.4
    policy_chosen = _random(BATCH, 7).double().requires_grad_()
    policy_rejected = _random(BATCH, 8).double().requires_grad_()
    reference_chosen, reference_rejected = _random(BATCH, 9).double(), _random(BATCH, 10).double()
    losses = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta).losses
    losses.sum().backward()
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    expected = -beta * torch.sigmoid(-beta * margin.detach())
    torch.testing.assert_close(policy_chosen.grad, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(policy_rejected.grad, -expected, atol=1e-12, rtol=1e-12)


# -------------------------------------------------------------------------------------- KTO
def _trl_kto(batch: dict, model: _LogProbModel, beta: float, desirable_weight: float, undesirable_weight: float):
    trainer = _trainer(
        beta=beta,
        loss_type="kto",
        calculate_KL=True,
        precompute_ref_logps=True,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)
    loss = KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("kl_shift, weights", [(-1.5, (1.0, 1.0)), (0.8, (1.0, 1.0)), (0.8, (1.3, 0.7))])
def test_kto_equals_trl(kl_shift, weights):
    """kl_shift < 0 makes the batch KL estimate negative, so the clamp at 0 is exercised."""
    input_ids, attention, completion, shifted = _completion_batch(BATCH, seed=11)
    kl_ids, kl_attention, kl_completion, kl_shifted = _completion_batch(BATCH, seed=12)
    desirable = torch.tensor([True, False, True, True, False, False])
    policy, policy_kl = shifted.sum(-1), kl_shifted.sum(-1)
    reference = policy + torch.randn(BATCH, generator=torch.Generator().manual_seed(13))
    reference_kl = policy_kl - kl_shift + 0.1 * torch.randn(BATCH, generator=torch.Generator().manual_seed(14))
    beta = 0.2
    ours = kto_loss(policy, reference, desirable, policy_kl, reference_kl, beta, *weights)
    assert kto_reference_point(policy_kl, reference_kl).item() == pytest.approx(
        max(0.0, (policy_kl - reference_kl).mean().item())
    )

    def trl_batch(rows):
        batch = {
            "input_ids": input_ids[rows],
            "attention_mask": attention[rows],
            "completion_mask": completion[rows],
            "KL_input_ids": kl_ids,
            "KL_attention_mask": kl_attention,
            "KL_completion_mask": kl_completion,
            "label": desirable[rows],
            "ref_logps": reference[rows],
            "ref_KL_logps": reference_kl,
        }
        model = _LogProbModel()
        model.register(batch["input_ids"], shifted[rows])
        model.register(kl_ids, kl_shifted)
        return batch, model

    for i in range(BATCH):
        loss, metrics = _trl_kto(*trl_batch([i]), beta, *weights)
        torch.testing.assert_close(ours.losses[i], loss, **TOLERANCE)
        reward = metrics["rewards/chosen" if desirable[i] else "rewards/rejected"][-1]
        mine = ours.chosen_rewards if desirable[i] else ours.rejected_rewards
        assert reward in [pytest.approx(r, abs=1e-6) for r in mine.tolist()]
    loss, metrics = _trl_kto(*trl_batch(list(range(BATCH))), beta, *weights)
    torch.testing.assert_close(ours.losses.mean(), loss, **TOLERANCE)
    assert metrics["kl"][-1] == pytest.approx(kto_reference_point(policy_kl, reference_kl).item(), abs=1e-6)


def test_kto_reference_point_carries_no_gradient():
    policy = _random(BATCH, 15).requires_grad_()
    policy_kl = _random(BATCH, 16).requires_grad_()
    desirable = torch.tensor([True, False] * (BATCH // 2))
    kto_loss(policy, _random(BATCH, 17), desirable, policy_kl, policy_kl.detach() - 1.0).losses.sum().backward()
    assert policy_kl.grad is None
    assert policy.grad is not None and bool((policy.grad != 0).all())


# ------------------------------------------------------------------------------ ORPO, SimPO
def test_orpo_equals_trl():
    chosen, rejected = _random(BATCH, 18, scale=3.0), _random(BATCH, 19, scale=3.0)
    chosen[0], rejected[1] = -1e-4, -0.5  # both branches of log(1 - e^x)
    beta, nll = 0.25, torch.tensor(1.7)
    ours = orpo_loss(chosen, rejected, beta, chosen_nll=nll)
    trainer = _trainer(beta=beta)
    losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
    # TRL keeps the term's sign as a log-likelihood and subtracts its mean from the NLL.
    torch.testing.assert_close(ours.losses, nll - losses, **TOLERANCE)
    torch.testing.assert_close(ours.losses.mean(), nll - losses.mean(), **TOLERANCE)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, **TOLERANCE)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, **TOLERANCE)


@pytest.mark.parametrize("beta, gamma, label_smoothing", [(2.0, 1.0, 0.0), (2.5, 0.5, 0.1), (0.1, 0.5, 0.0)])
def test_simpo_equals_trl(beta, gamma, label_smoothing):
    chosen, rejected = _random(BATCH, 20, scale=2.0), _random(BATCH, 21, scale=2.0)
    ours = simpo_loss(chosen, rejected, beta, gamma, label_smoothing)
    trainer = _trainer(alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma, label_smoothing=label_smoothing)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(trainer, chosen, rejected)
    torch.testing.assert_close(ours.losses, losses, **TOLERANCE)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards, **TOLERANCE)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards, **TOLERANCE)


# ------------------------------------------------------------------------------------- GRPO
def _trl_grpo(logps, old_logps, ref_logps, advantages, mask, **settings) -> torch.Tensor:
    batch, width = logps.shape
    trainer = _trainer(
        beta=settings["beta"],
        loss_type=settings["loss_type"],
        epsilon_low=settings["epsilon_low"],
        epsilon_high=settings["epsilon_high"],
        max_completion_length=settings["max_completion_length"],
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=settings["delta"], steps_per_generation=1),
    )
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logps, torch.zeros_like(logps), None)
    inputs = {
        "prompt_ids": torch.ones(batch, 3, dtype=torch.long),
        "prompt_mask": torch.ones(batch, 3, dtype=torch.long),
        "completion_ids": torch.ones(batch, width, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old_logps,
        "ref_per_token_logps": ref_logps,
        "num_items_in_batch": mask.sum(),
    }
    return GRPOTrainer._compute_loss(trainer, None, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta, epsilon_high, delta", [(0.0, 0.2, None), (0.04, 0.28, None), (0.1, 0.2, 1.5)])
def test_grpo_loss_and_gradient_equal_trl(loss_type, beta, epsilon_high, delta):
    batch, width = 8, 10
    generator = torch.Generator().manual_seed(22)
    lengths = torch.randint(1, width + 1, (batch,), generator=generator)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    old = -torch.rand(batch, width, generator=generator) * 4
    # Ratios spread well past both clip edges.
    current = old + torch.randn(batch, width, generator=generator) * 0.4
    reference = old + torch.randn(batch, width, generator=generator) * 0.3
    advantages = torch.randn(batch, generator=generator)
    settings = dict(
        beta=beta,
        loss_type=loss_type,
        epsilon_low=0.2,
        epsilon_high=epsilon_high,
        max_completion_length=12,
        delta=delta,
    )
    ours_input = current.clone().requires_grad_()
    ours = grpo_loss(
        ours_input,
        advantages,
        mask,
        old_per_token_logps=old,
        reference_per_token_logps=reference if beta else None,
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=epsilon_high,
        loss_type=loss_type,
        max_completion_length=12,
        delta=delta,
    )
    trl_input = current.clone().requires_grad_()
    theirs = _trl_grpo(trl_input, old, reference, advantages, mask, **settings)
    torch.testing.assert_close(ours.loss, theirs, **TOLERANCE)
    ours.loss.backward()
    theirs.backward()
    torch.testing.assert_close(ours_input.grad, trl_input.grad, **TOLERANCE)
    assert 0 < ours.clipped_fraction < 1
    assert (ours.per_token_kl is None) == (beta == 0)


def test_grpo_on_policy_ratio_is_one_with_the_policy_gradient():
    """Without old log-probs the ratio is exp(logp - logp.detach()) = 1; its gradient is the
    REINFORCE one, -A / tokens for the "bnpo" mean."""
    logps = _random((2, 3), 23).requires_grad_()
    advantages = torch.tensor([1.0, -2.0])
    result = grpo_loss(logps, advantages, torch.ones(2, 3), loss_type="bnpo")
    torch.testing.assert_close(result.loss, -advantages.mean())
    result.loss.backward()
    torch.testing.assert_close(logps.grad, -advantages[:, None].expand(2, 3) / 6)


# ----------------------------------------------------------------------------- reward model
@pytest.mark.parametrize("margin, center", [(None, None), (True, None), (None, 0.01), (True, 0.05)])
def test_reward_model_loss_equals_trl(margin, center):
    chosen, rejected = torch.randn(BATCH) * 2, torch.randn(BATCH) * 2
    margins = torch.rand(BATCH) if margin else None
    ours = reward_model_loss(chosen, rejected, margins, center)
    trainer = _trainer(args=SimpleNamespace(center_rewards_coefficient=center))
    inputs = {"input_ids": torch.ones(2 * BATCH, 4, dtype=torch.long), "attention_mask": torch.ones(2 * BATCH, 4)}
    if margins is not None:
        inputs["margin"] = margins

    def model(**kwargs):
        return SimpleNamespace(logits=torch.cat((chosen, rejected))[:, None])

    theirs = RewardTrainer.compute_loss(trainer, model, inputs)
    torch.testing.assert_close(ours.losses.mean(), theirs, **TOLERANCE)
    assert trainer._metrics["train"]["accuracy"][-1] == pytest.approx((chosen > rejected).float().mean().item())


# -------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_what_is_accepted():
    x = _random(4, 24)
    with pytest.raises(ValueError, match="beta must be"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="beta must be"):
        simpo_loss(x, x, beta=-1.0)
    with pytest.raises(ValueError, match=r"accepted: sigmoid, hinge, ipo, robust"):
        dpo_loss(x, x, x, x, loss_type="kto_pair")
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="not to 'hinge'"):
        dpo_loss(x, x, x, x, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="shapes differ"):
        dpo_loss(x, x[:3], x, x)
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        dpo_loss(x[None], x[None], x[None], x[None])
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="bool tensor"):
        kto_loss(x, x, torch.ones(4), x, x)
    with pytest.raises(ValueError, match="both policy_kl_logps"):
        kto_loss(x, x, torch.ones(4, dtype=torch.bool), x, None)
    with pytest.raises(ValueError, match="must be < 0"):
        orpo_loss(torch.zeros(4), x)
    with pytest.raises(ValueError, match=r"accepted: grpo, bnpo, dr_grpo, dapo"):
        grpo_loss(x[None], x[:1], torch.ones(1, 4), loss_type="ppo")
    with pytest.raises(ValueError, match="reference_per_token_logps"):
        grpo_loss(x[None], x[:1], torch.ones(1, 4), beta=0.1)
    with pytest.raises(ValueError, match="completion_mask has shape"):
        grpo_loss(x[None], x[:1], torch.ones(1, 5))
    with pytest.raises(ValueError, match="margin must be"):
        reward_model_loss(x, x, margin=torch.ones(3))
