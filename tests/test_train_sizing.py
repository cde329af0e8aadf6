"""Sizing tools: the Chinchilla calculator against the paper's numbers and a numerical
optimum, the power-law fit on synthetic sweeps with known exponents, and the gradient noise
scale on a problem whose critical batch size is known in closed form; and their commands."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from torch import nn

from genforge.cli import main
from genforge.config import Config
from genforge.model import Transformer
from genforge.train import TokenDataset
from genforge.train.sizing import (
    ChinchillaLaw,
    SizingError,
    chinchilla_optimal,
    fit_power_law,
    gradient_noise_scale,
    language_model_noise_scale,
    noise_scale_from_norms,
    plot_power_law,
    training_flops,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------- Chinchilla
@pytest.mark.parametrize(
    "flops, parameters, tokens",
    [
        # Hoffmann et al. 2022, Table 3 (Approach 1): FLOPs, parameters, tokens.
        (1.92e19, 400e6, 8.0e9),
        (1.21e20, 1e9, 20.2e9),
        (1.23e22, 10e9, 205.1e9),
        (5.76e23, 67e9, 1.5e12),
    ],
)
def test_twenty_tokens_per_parameter_reproduces_the_papers_table(flops, parameters, tokens):
    plan = chinchilla_optimal(flops, method="rule")
    assert plan.parameters == pytest.approx(parameters, rel=0.05)
    assert plan.tokens == pytest.approx(tokens, rel=0.08)
    assert training_flops(plan.parameters, plan.tokens) == pytest.approx(flops)


def test_fitted_law_optimum_is_the_numerical_minimum():
    law = ChinchillaLaw()
    # The paper's Table 2 (Approach 3) gives a = 0.46, b = 0.54, from its unrounded estimates;
    # the rounded alpha = 0.34, beta = 0.28 it prints give 0.452 and 0.548.
    assert law.exponents == pytest.approx((0.46, 0.54), abs=0.01)
    # Chinchilla itself (70B parameters, 1.4T tokens): about 1.94 nats/token under the fit.
    assert law.loss(70e9, 1.4e12) == pytest.approx(1.94, abs=0.01)
    for flops in (1e18, 1e21, 5.76e23, 1e26):
        plan = chinchilla_optimal(flops)
        numeric = minimize_scalar(
            lambda log_n, flops=flops: law.loss(math.exp(log_n), flops / (6 * math.exp(log_n))),
            bounds=(math.log(1e3), math.log(1e15)),
            method="bounded",
            options={"xatol": 1e-10},
        )
        assert plan.parameters == pytest.approx(math.exp(numeric.x), rel=1e-4)
        assert training_flops(plan.parameters, plan.tokens) == pytest.approx(flops)
        assert plan.predicted_loss <= law.loss(2 * plan.parameters, plan.tokens / 2)
    # Optimal tokens per parameter grow with compute because beta < alpha.
    assert chinchilla_optimal(1e26).tokens_per_parameter > chinchilla_optimal(1e20).tokens_per_parameter


def test_chinchilla_rejects_bad_input():
    with pytest.raises(SizingError, match="flops must be"):
        chinchilla_optimal(-1.0)
    with pytest.raises(SizingError, match="accepted: fit, rule"):
        chinchilla_optimal(1e20, method="kaplan")


# ------------------------------------------------------------------- power-law fit
def test_power_law_fit_recovers_a_known_exponent():
    compute = np.logspace(15, 19, 9)
    noise = np.exp(np.random.default_rng(0).normal(0, 0.01, compute.shape))
    loss = 3.1e2 * compute**-0.11 * noise
    fit = fit_power_law(compute, loss)
    assert fit.b == pytest.approx(0.11, abs=0.005)
    assert fit.e == 0.0 and fit.r2 > 0.99
    assert fit.predict(1e17) == pytest.approx(3.1e2 * 1e17**-0.11, rel=0.03)


def test_power_law_fit_with_an_irreducible_loss(tmp_path):
    compute = np.logspace(14, 20, 12)
    loss = 1.7 + 4.0e3 * compute**-0.2
    fit = fit_power_law(compute, loss, irreducible=True)
    assert fit.e == pytest.approx(1.7, rel=1e-3)
    assert fit.b == pytest.approx(0.2, rel=1e-3)
    assert fit.a == pytest.approx(4.0e3, rel=1e-2)
    # Without the irreducible term the same points bend away from a straight log-log line.
    assert fit_power_law(compute, loss).r2 < fit.r2
    path = plot_power_law(fit, compute, loss, tmp_path / "fit.png", extrapolate_to=1e22)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_power_law_fit_rejects_bad_points():
    with pytest.raises(SizingError, match="at least 3 points"):
        fit_power_law([1e15, 1e16], [3.0, 2.9])
    with pytest.raises(SizingError, match="> 0"):
        fit_power_law([1e15, 1e16, -1.0], [3.0, 2.9, 2.8])
    with pytest.raises(SizingError, match="equal-length"):
        fit_power_law([1e15, 1e16, 1e17], [3.0, 2.9])


# --------------------------------------------------------------- gradient noise scale
def test_two_batch_estimator_inverts_the_expected_norms():
    g2, trace, small, big = 2.5, 40.0, 4, 64
    measured = {b: g2 + trace / b for b in (small, big)}  # E|G_B|^2 = |G|^2 + tr(Sigma)/B
    assert noise_scale_from_norms(measured[small], measured[big], small, big) == pytest.approx((g2, trace))
    with pytest.raises(SizingError, match="small_batch < big_batch"):
        noise_scale_from_norms(1.0, 1.0, 8, 8)


def test_noise_scale_of_a_problem_with_a_known_answer():
    """Per-example gradients x ~ N(mu, sigma^2 I) in d dimensions: |G|^2 = |mu|^2 and
    tr(Sigma) = d sigma^2, so B_simple = d sigma^2 / |mu|^2 (here 50 * 1 / 2 = 25)."""
    d, sigma = 50, 1.0
    mu = torch.zeros(d)
    mu[:2] = 1.0
    model = nn.Linear(d, 1, bias=False)  # loss = mean_i w.x_i, so its gradient is the batch mean of x

    def sample(size, generator):
        return mu + sigma * torch.randn(size, d, generator=generator)

    estimate = gradient_noise_scale(model, lambda m, x: m(x).mean(), sample, small_batch=4, big_batch=64, trials=400)
    assert estimate.gradient_norm_sq == pytest.approx(2.0, rel=0.15)
    assert estimate.trace_covariance == pytest.approx(50.0, rel=0.1)
    assert estimate.critical_batch == pytest.approx(25.0, rel=0.2)
    assert model.weight.grad is None  # measuring leaves no gradients behind


def test_language_model_noise_scale_runs_on_a_transformer():
    torch.manual_seed(0)
    model = Transformer(
        Config(
            family="llama",
            vocab_size=64,
            hidden_size=32,
            num_layers=1,
            num_heads=4,
            intermediate_size=48,
            max_position_embeddings=32,
        )
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # A learnable stream (a cycle with some random tokens) so the true gradient stands out of the noise.
    stream = torch.arange(64 * 16) % 20 + 3
    flips = torch.rand(stream.shape, generator=torch.Generator().manual_seed(1)) < 0.2
    stream[flips] = torch.randint(3, 64, (int(flips.sum()),), generator=torch.Generator().manual_seed(2))
    data = TokenDataset(stream, 16)
    estimate = language_model_noise_scale(model, data, small_batch=2, big_batch=16, trials=6)
    assert estimate.gradient_norm_sq > 0 and estimate.trace_covariance > 0
    assert math.isfinite(estimate.critical_batch) and estimate.critical_batch > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(SizingError, match="exceeds"):
        language_model_noise_scale(model, data, small_batch=2, big_batch=1000)
    with pytest.raises(SizingError, match="smaller than big_batch"):
        language_model_noise_scale(model, data, small_batch=8, big_batch=4)


# -------------------------------------------------------------------------- commands
def test_size_commands(tmp_path, capsys):
    assert main(["size", "chinchilla", "--flops", "1.92e19", "--method", "rule"]) == 0
    plan = json.loads(capsys.readouterr().out)["plans"][0]
    assert plan["parameters"] == pytest.approx(4e8, rel=0.01)

    points = tmp_path / "points.csv"
    with open(points, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["compute", "loss"])
        for c in np.logspace(15, 18, 5):
            writer.writerow([c, 50 * c**-0.07])
    assert (
        main(["size", "fit", "--points", str(points), "--plot", str(tmp_path / "fit.png"), "--extrapolate", "1e20"])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["fit"]["b"] == pytest.approx(0.07, abs=1e-6)
    assert out["predicted_loss"]["1e+20"] == pytest.approx(50 * 1e20**-0.07, rel=1e-5)
    assert (tmp_path / "fit.png").exists()

    assert main(["size", "fit"]) == 2  # neither --points nor --runs: a clear error, not a traceback
    assert "--points" in capsys.readouterr().err


def test_noise_scale_command(text_model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    assert (
        main(
            [
                "size",
                "noise-scale",
                "--model",
                str(text_model_dir),
                "--text",
                str(text),
                "--seq-len",
                "16",
                "--small",
                "2",
                "--big",
                "8",
                "--trials",
                "3",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["critical_batch_tokens"] == pytest.approx(out["critical_batch"] * 16)
