"""genforge.safety.privacy: DP-SGD's mechanism and accountants, checked against Opacus (per-sample
gradients of a genforge tiny model through GradSampleModule, ε of RDPAccountant and
GaussianAccountant), against numerical integration of the RDP moment, and by statistics of the
noise and the Poisson batches; then DP-SGD in the trainer (full and LoRA), its resume and refusals."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import tiny_encoder, tiny_model
from scipy import integrate, stats

from genforge.finetune.lora import LoraConfig, apply_lora
from genforge.safety.privacy import (
    DEFAULT_ORDERS,
    DPSGD,
    DPConfig,
    PrivacyError,
    RDPAccountant,
    add_gaussian_noise,
    causal_example_loss,
    clip_and_sum,
    epsilon_from_rdp,
    gdp_epsilon,
    noise_multiplier_for_epsilon,
    per_sample_gradients,
    per_sample_norms,
    poisson_sample,
    step_generator,
    subsampled_gaussian_rdp,
)
from genforge.train import TokenDataset, TrainConfig, Trainer, TrainError

pytestmark = pytest.mark.usefixtures("one_thread")


def _opacus_per_sample(model, inputs):
    """Opacus's per-sample gradients of each row's mean next-token cross-entropy."""
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, loss_reduction="sum")
    logits = wrapped(inputs).logits
    vocab = logits.shape[-1]
    per_row = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), inputs[:, 1:].reshape(-1), reduction="none")
    per_row.view(inputs.shape[0], -1).mean(dim=1).sum().backward()
    grads = {name: p.grad_sample for name, p in model.named_parameters() if p.requires_grad}
    wrapped._close()
    return grads


def test_per_sample_gradients_equal_opacus():
    """Full fine-tuning of a genforge tiny decoder: Opacus's GradSampleModule wraps it as it is."""
    model = tiny_model(seed=3)
    inputs = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(0))
    ours, losses = per_sample_gradients(model, causal_example_loss, [inputs, inputs])
    assert sorted(ours) == sorted(n for n, _ in model.named_parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = _opacus_per_sample(model, inputs)
    for name, p in model.named_parameters():
        assert ours[name].shape == reference[name].shape == (6, *p.shape)
        torch.testing.assert_close(ours[name], reference[name], atol=1e-5, rtol=0)
    for i in range(inputs.shape[0]):
        assert losses[i].item() == pytest.approx(causal_example_loss(model, inputs[i], inputs[i]).item(), abs=1e-5)


def test_per_sample_gradients_of_lora_are_the_adapters_own():
    """LoRA: only the adapters' per-sample gradients, equal to each example's own backward
    through LoRA's fused autograd function (Opacus cannot wrap LoRA's layers: their adapter
    tensors sit in ParameterDicts that never run a forward of their own, so its hooks never fire)."""
    model = tiny_model(seed=3)
    model.requires_grad_(False)
    apply_lora(model, LoraConfig(target_modules=["qkv", "down"], r=4, lora_alpha=8))
    torch.manual_seed(5)
    for name, p in model.named_parameters():  # LoRA's B starts at zero: give it values
        if "lora_" in name:
            p.data.normal_(0, 0.1)
    inputs = torch.randint(0, 64, (5, 12), generator=torch.Generator().manual_seed(0))
    grads, _ = per_sample_gradients(model, causal_example_loss, [inputs, inputs])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(grads) == sorted(trainable) and all("lora_" in name for name in grads)
    for i in range(inputs.shape[0]):
        model.zero_grad()
        causal_example_loss(model, inputs[i], inputs[i]).backward()
        for name, p in trainable.items():
            torch.testing.assert_close(grads[name][i], p.grad, atol=1e-6, rtol=0)


def test_per_sample_gradients_of_sft_rows_ignore_prompt_tokens():
    """Rows with ignored labels (a fine-tuning prompt): the gradient of the mean over the answer
    tokens, as a per-example backward gives it."""
    model = tiny_model(seed=1)
    inputs = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(2))
    labels = inputs.clone()
    labels[0, :6] = -100
    labels[1, :] = -100  # no target at all: zero gradient, zero loss
    grads, losses = per_sample_gradients(model, causal_example_loss, [inputs, labels])
    for i in range(3):
        model.zero_grad()
        causal_example_loss(model, inputs[i], labels[i]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, atol=1e-6, rtol=0)
    assert losses[1].item() == 0.0
    assert per_sample_norms(grads)[1].item() == 0.0


def test_clipping_bounds_every_example_and_keeps_small_ones():
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.1, 0.5, 3.0, 40.0])
    grads = {
        "a": torch.randn(4, 5, 3, generator=generator) * scales[:, None, None],
        "b": torch.randn(4, 7, generator=generator) * scales[:, None],
    }
    norms = per_sample_norms(grads)
    max_norm = 1.0
    summed, reported = clip_and_sum(grads, max_norm)
    torch.testing.assert_close(reported, norms)
    factors = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    clipped = {k: v * factors.view(-1, *[1] * (v.dim() - 1)) for k, v in grads.items()}
    after = per_sample_norms(clipped)
    assert (after <= max_norm + 1e-6).all()
    small = norms < max_norm
    assert small.any() and (~small).any()
    torch.testing.assert_close(after[small], norms[small])  # under the bound: untouched
    torch.testing.assert_close(after[~small], torch.full_like(after[~small], max_norm), atol=1e-5, rtol=0)
    for name in grads:
        torch.testing.assert_close(summed[name], clipped[name].sum(dim=0))
    with pytest.raises(PrivacyError, match="max_grad_norm"):
        clip_and_sum(grads, 0.0)


def test_noise_has_the_stated_scale():
    """(0 + N(0, (σC)²)) / B: a KS test against that normal, and the sample variance's
    chi-square interval."""
    sigma, clip, expected = 1.3, 0.7, 16.0
    summed = {"w": torch.zeros(200, 250, dtype=torch.float64)}
    noisy = add_gaussian_noise(summed, sigma, clip, expected, torch.Generator().manual_seed(7))["w"].flatten().numpy()
    std = sigma * clip / expected
    assert stats.kstest(noisy, "norm", args=(0.0, std)).pvalue > 1e-3
    n = noisy.size
    statistic = (n - 1) * noisy.var(ddof=1) / std**2
    assert stats.chi2.ppf(1e-4, n - 1) < statistic < stats.chi2.ppf(1 - 1e-4, n - 1)
    # a wrong scale is caught: noise of 1.1x the std fails the same test
    assert stats.kstest(noisy * 1.1, "norm", args=(0.0, std)).pvalue < 1e-3
    # and the noise is added to the signal, then divided
    signal = {"w": torch.full((3,), 8.0)}
    quiet = add_gaussian_noise(signal, 0.0, clip, 4.0, torch.Generator().manual_seed(0))["w"]
    torch.testing.assert_close(quiet, torch.full((3,), 2.0))


def test_poisson_sampling_rate_and_determinism():
    size, rate = 1000, 0.05
    sizes = [len(poisson_sample(size, rate, step_generator(0, step, 0))) for step in range(400)]
    mean, variance = np.mean(sizes), np.var(sizes, ddof=1)
    expected_var = size * rate * (1 - rate)
    assert abs(mean - size * rate) < 4 * math.sqrt(expected_var / len(sizes))
    assert 0.75 * expected_var < variance < 1.3 * expected_var
    assert poisson_sample(size, rate, step_generator(3, 9, 0)) == poisson_sample(size, rate, step_generator(3, 9, 0))
    assert poisson_sample(size, rate, step_generator(3, 9, 0)) != poisson_sample(size, rate, step_generator(3, 10, 0))


# ------------------------------------------------------------------------------ accounting
SETTINGS = [  # (noise multiplier, sample rate, steps, delta)
    (1.1, 0.01, 1000, 1e-5),
    (0.8, 0.004, 5000, 1e-6),
    (2.0, 0.1, 200, 1e-5),
    (4.0, 0.25, 50, 1e-3),
    (0.6, 0.02, 100, 1e-5),
    (1.0, 1.0, 10, 1e-5),  # no subsampling
]


@pytest.mark.parametrize("noise,rate,steps,delta", SETTINGS)
def test_rdp_epsilon_equals_opacus(noise, rate, steps, delta):
    from opacus.accountants import RDPAccountant as OpacusRDP

    reference = OpacusRDP()
    reference.history = [(noise, rate, steps)]
    expected = reference.get_epsilon(delta)
    ours = RDPAccountant()
    ours.step(noise, rate, steps)
    assert ours.epsilon(delta) == pytest.approx(expected, abs=1e-3)


def test_rdp_moment_equals_numerical_integration():
    """A_α = E_{z~N(0,σ²)}[(1 - q + q exp((2z - 1) / (2σ²)))^α], at integer and fractional α."""
    sigma, rate = 1.2, 0.05
    orders = [1.5, 2.0, 3.0, 4.7, 8.0, 12.5]

    def moment(order):
        def integrand(z):
            ratio = 1 - rate + rate * math.exp((2 * z - 1) / (2 * sigma**2))
            return stats.norm.pdf(z, 0, sigma) * ratio**order

        return integrate.quad(integrand, -40, 40, limit=200, epsabs=0, epsrel=1e-12)[0]

    expected = [math.log(moment(a)) / (a - 1) for a in orders]
    np.testing.assert_allclose(subsampled_gaussian_rdp(rate, sigma, orders), expected, rtol=1e-7)


@pytest.mark.parametrize("noise,rate,steps,delta", SETTINGS[:4])
def test_gdp_epsilon_equals_opacus(noise, rate, steps, delta):
    from opacus.accountants import GaussianAccountant

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus warns that GDP is an approximation: the docs say so too
        reference = GaussianAccountant()
    reference.history = [(noise, rate, steps)]
    assert gdp_epsilon(noise, rate, steps, delta) == pytest.approx(reference.get_epsilon(delta), rel=1e-4, abs=1e-4)


def test_accountant_composes_and_calibrates():
    accountant = RDPAccountant()
    accountant.step(1.0, 0.01, 100)
    accountant.step(1.0, 0.01, 50)  # merged with the stretch before
    accountant.step(2.0, 0.02, 10)
    assert accountant.history == [[1.0, 0.01, 150], [2.0, 0.02, 10]]
    combined = 150 * subsampled_gaussian_rdp(0.01, 1.0) + 10 * subsampled_gaussian_rdp(0.02, 2.0)
    assert accountant.epsilon(1e-5) == pytest.approx(epsilon_from_rdp(combined, DEFAULT_ORDERS, 1e-5)[0])
    restored = RDPAccountant()
    restored.load_state_dict(json.loads(json.dumps(accountant.state_dict())))
    assert restored.epsilon(1e-5) == accountant.epsilon(1e-5)
    fewer, more = RDPAccountant(), RDPAccountant()
    fewer.step(1.0, 0.01, 150)
    more.step(1.0, 0.01, 300)
    assert more.epsilon(1e-5) > fewer.epsilon(1e-5) > 0 == RDPAccountant().epsilon(1e-5)
    sigma = noise_multiplier_for_epsilon(2.0, 1e-5, 0.01, 1000)
    spent = RDPAccountant()
    spent.step(sigma, 0.01, 1000)
    assert spent.epsilon(1e-5) == pytest.approx(2.0, abs=0.01) and spent.epsilon(1e-5) <= 2.0
    for bad in (dict(delta=0.0), dict(delta=1.5)):
        with pytest.raises(PrivacyError, match="delta"):
            accountant.epsilon(bad["delta"])
    with pytest.raises(PrivacyError, match="sample rate"):
        subsampled_gaussian_rdp(1.5, 1.0)
    with pytest.raises(PrivacyError, match="orders"):
        subsampled_gaussian_rdp(0.1, 1.0, [1.0])


# ------------------------------------------------------------------------------ in the trainer
def _data(rows=64, seq_len=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return TokenDataset(torch.randint(0, 64, (rows * seq_len,), generator=generator), seq_len)


def _config(out, steps, **overrides):
    settings = dict(out_dir=out, max_steps=steps, batch_size=4, grad_accum=2, progress=False, export=False, lr=1e-3)
    return TrainConfig(**(settings | overrides))


def test_dp_step_is_the_clipped_noisy_mean_of_the_poisson_batch(tmp_path):
    data = _data()
    model = tiny_model(seed=2)
    dp = DPSGD(DPConfig(noise_multiplier=0.9, max_grad_norm=0.5, delta=1e-4))
    trainer = Trainer(model, data, _config(tmp_path, 1), privacy=dp)
    assert dp.sample_rate == pytest.approx(8 / 64)
    batches = trainer._next_batches()
    indices = poisson_sample(64, 8 / 64, step_generator(0, 0, 0))
    assert all(b.shape[0] <= 4 for b in batches) and sum(b.shape[0] for b in batches) == len(indices)
    rows = data.batch(indices)
    grads, _ = per_sample_gradients(model, causal_example_loss, [rows, rows])
    summed, _ = clip_and_sum(grads, 0.5)
    expected = add_gaussian_noise(summed, 0.9, 0.5, 8.0, step_generator(0, 0, 1))
    loss, tokens, metrics = trainer.privacy.backward(trainer, batches)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-5)
    assert tokens == rows.numel() and metrics["batch_examples"] == len(indices)
    assert metrics["epsilon"] == pytest.approx(dp.accountant.epsilon(1e-4)) and metrics["epsilon"] > 0
    model.zero_grad(set_to_none=True)
    record = trainer.train_step(batches)  # the same gradient, then the optimizer and the schedule
    assert record["step"] == 1 and record["loss"] == pytest.approx(loss)
    assert record["grad_norm"] == pytest.approx(float(torch.cat([g.flatten() for g in expected.values()]).norm()))


def test_dp_training_reports_epsilon_and_resumes_with_its_accountant(tmp_path):
    class Killed(Exception):
        pass

    def kill_at_two(step, path):
        if step == 2:
            raise Killed

    def run(out, resume=False, on_checkpoint=None):
        torch.manual_seed(0)
        dp = DPSGD(DPConfig(1.0, 1.0, 1e-4, accountant="gdp"))
        trainer = Trainer(tiny_model(seed=4), _data(), _config(out, 4, save_every=2), privacy=dp)
        return trainer, trainer.train(resume=resume, on_checkpoint=on_checkpoint)

    whole_trainer, whole = run(tmp_path / "whole")
    assert whole.privacy["steps"] == 4 and whole.privacy["sample_rate"] == pytest.approx(0.125)
    reference = RDPAccountant()
    reference.step(1.0, 0.125, 4)
    assert whole.privacy["epsilon"] == pytest.approx(reference.epsilon(1e-4))
    assert whole.privacy["epsilon_gdp"] == pytest.approx(gdp_epsilon(1.0, 0.125, 4, 1e-4))
    epsilons = [r["epsilon"] for r in whole_trainer.read_metrics() if "epsilon" in r]
    assert len(epsilons) == 4 and epsilons == sorted(epsilons) and epsilons[0] > 0

    with pytest.raises(Killed):
        run(tmp_path / "split", on_checkpoint=kill_at_two)
    resumed_trainer, resumed = run(tmp_path / "split", resume=True)
    assert resumed.privacy == whole.privacy  # the accountant carried its first two steps
    for (name, a), (_, b) in zip(whole_trainer.model.named_parameters(), resumed_trainer.model.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert state["privacy"]["accountant_state"]["history"] == [[1.0, 0.125, 4]]
    # a DP checkpoint is not resumed without DP (nor the reverse)
    plain = Trainer(tiny_model(seed=4), _data(), _config(tmp_path / "split", 6, save_every=2))
    with pytest.raises(TrainError, match="with DP-SGD"):
        plain.train(resume=True)


def test_dp_refusals(tmp_path):
    data = _data()
    cases = [
        (dict(model=tiny_encoder(), config=dict(mask_token_id=1)), "masked-LM"),
        (dict(config=dict(gradient_checkpointing=True)), "gradient checkpointing"),
        (dict(dp=dict(delta=0.1)), "not below 1 / 64"),
        (dict(config=dict(batch_size=40, grad_accum=2)), "exceeds the 64 training rows"),
        (dict(regularizer=lambda model: torch.zeros(())), "regularizer"),
    ]
    for case, message in cases:
        dp = DPSGD(DPConfig(1.0, 1.0, **({"delta": 1e-4} | case.get("dp", {}))))
        with pytest.raises(PrivacyError, match=message):
            Trainer(
                case.get("model", tiny_model()),
                data,
                _config(tmp_path, 1, **case.get("config", {})),
                privacy=dp,
                regularizer=case.get("regularizer"),
            )
    for bad, message in (
        (dict(noise_multiplier=-1.0), "noise multiplier"),
        (dict(noise_multiplier=1.0, max_grad_norm=0.0), "max_grad_norm"),
        (dict(noise_multiplier=1.0, accountant="prv"), "accountant"),
    ):
        with pytest.raises(PrivacyError, match=message):
            DPSGD(DPConfig(**bad))


def test_finetune_with_dp_lora_trains_adapters_only(tmp_path):
    from finetune_shared import arithmetic_records, tiny_chat_model_dir

    from genforge.finetune.run import FinetuneConfig, FinetuneError, finetune

    model_dir = tiny_chat_model_dir(tmp_path / "base")
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_records(60)))
    settings = dict(model_dir=model_dir, data=data, method="lora", max_steps=3, batch_size=4, progress=False)
    result = finetune(FinetuneConfig(out_dir=tmp_path / "run", dp_noise_multiplier=1.2, dp_delta=1e-3, **settings))
    assert result.privacy["steps"] == 3 and result.privacy["epsilon"] > 0
    summary = json.loads((tmp_path / "run" / "finetune.json").read_text())
    assert summary["privacy"]["epsilon"] == pytest.approx(result.privacy["epsilon"])
    with pytest.raises(FinetuneError, match="packing off"):
        finetune(FinetuneConfig(out_dir=tmp_path / "packed", dp_noise_multiplier=1.0, packing=True, **settings))


def test_pretrain_command_with_dp_flags(tmp_path, capsys):
    from finetune_shared import tiny_chat_model_dir

    from genforge.cli import main

    model_dir = tiny_chat_model_dir(tmp_path / "base")
    (tmp_path / "corpus.txt").write_text("the key value cache keeps past keys and values so decoding is fast. " * 40)
    base = ["pretrain", "--model", str(model_dir), "--text", str(tmp_path / "corpus.txt"), "--seq-len", "16"]
    base += ["--batch-size", "2", "--warmup", "0", "--eval-every", "0", "--save-every", "0", "--steps", "2"]
    dp = ["--dp-noise", "1.5", "--dp-max-grad-norm", "0.5", "--dp-delta", "1e-3"]
    assert main(base + ["--out", str(tmp_path / "run"), *dp]) == 0
    assert "DP-SGD: (epsilon " in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epsilon"] > 0 for r in records if "loss" in r] == [True, True]
    with pytest.raises(SystemExit):  # argparse refuses a negative multiplier
        main(base + ["--out", str(tmp_path / "bad"), "--dp-noise", "-1"])
    assert main(base + ["--out", str(tmp_path / "bad"), "--dp-noise", "1", "--dp-delta", "0.5"]) == 2
    assert "not below 1 /" in capsys.readouterr().err
