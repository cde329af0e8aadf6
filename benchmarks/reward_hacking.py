"""Reward hacking, shown: PPO on a proxy reward without a KL penalty raises the proxy while the
true task reward falls; the same run with the KL penalty keeps the true reward.

Everything is made on the spot, nothing is downloaded:

- the task: copy a string of 3 to 6 digits ("4719=" -> "4719<eos>"); the true reward of an
  answer is its share of digits in the right place, over the longer of answer and target
  (1 for an exact copy, lower for a wrong digit, a missing one or any extra one);
- the SFT model: a small Llama-style decoder over a 14-symbol vocabulary (digits, "=", <eos>,
  <bos>), trained on the spot on the task with the completion-only log-likelihood
  (`genforge.align.logprobs.completion_logprobs`) for 150 steps: it copies most strings, not
  all, so its samples still vary;
- the proxy: a length-correlated score, the kind of flaw a reward model learns from few pairs:
  the number of answer tokens that are digits of the prompt, over the prompt's digit count.
  On the SFT model's answers it agrees with the true reward (an exact copy scores 1, a wrong
  digit less), but it keeps paying for digits past the end, which the true reward punishes.

Both PPO runs (`genforge.align.ppo.PPOTrainer`, all weights, the same seed, prompts, learning
rate and steps) optimise the proxy; one with kl_coef = 0, one with the adaptive KL controller
(Ziegler et al. 2019; kl_coef 0.3 at the start, a target of 0.5 nat per sample, a horizon of 500
samples, short enough for the controller to act within 40 steps). The true reward of the same samples is logged each step but never
optimised. Writes benchmarks/results/reward_hacking.{json,md,png}.

    PYTHONPATH=src python benchmarks/reward_hacking.py
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from machine import describe, write_results

from genforge.align.logprobs import completion_logprobs
from genforge.align.ppo import PPOConfig, PPOTrainer, PromptRecord
from genforge.atomic import atomic_path
from genforge.config import Config
from genforge.model import Transformer
from genforge.tokenizer import Tokenizer

SYMBOLS = ["<eos>", "<bos>", "="] + list("0123456789")
EOS, BOS, EQUALS = 0, 1, 2
DIGIT_IDS = list(range(3, 13))


def digits_tokenizer() -> Tokenizer:
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.WordLevel({s: i for i, s in enumerate(SYMBOLS)}, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return Tokenizer(backend, {"eos_token": "<eos>", "bos_token": "<bos>"})


def build_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    config = Config(
        family="llama",
        vocab_size=len(SYMBOLS),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_position_embeddings=48,
        eos_token_id=EOS,
    )
    return Transformer(config)


def random_digits(rng: random.Random) -> list[int]:
    return [rng.choice(DIGIT_IDS) for _ in range(rng.randint(3, 6))]


def prompt_ids(digits: list[int]) -> list[int]:
    return [BOS, *digits, EQUALS]


# ------------------------------------------------------------------------------------ rewards
def answer_digits(ids: list[int]) -> list[int]:
    """The answer: the completion up to its end-of-sequence token."""
    return ids[: ids.index(EOS)] if EOS in ids else list(ids)


def true_reward(target: list[int], ids: list[int]) -> float:
    """The share of target digits in their place, over the longer of answer and target."""
    answer = answer_digits(ids)
    right = sum(a == t for a, t in zip(answer, target))
    return right / max(len(target), len(answer))


def proxy_reward(target: list[int], ids: list[int]) -> float:
    """Answer tokens that are digits of the prompt, over the prompt's digit count: 1 for an
    exact copy, and more for every such digit past the end."""
    wanted = set(target)
    return sum(token in wanted for token in answer_digits(ids)) / len(target)


def proxy(prompts, completions, completion_ids, digits):
    return [proxy_reward(target, ids) for target, ids in zip(digits, completion_ids)]


# --------------------------------------------------------------------------------------- SFT
def supervised_fine_tune(model: Transformer, steps: int, batch: int, lr: float, seed: int) -> list[float]:
    """Train the copy task (completion-only log-likelihood); returns the loss curve."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    model.train()
    for _ in range(steps):
        rows = []
        for _ in range(batch):
            digits = random_digits(rng)
            rows.append((prompt_ids(digits), digits + [EOS]))
        width = max(len(p) + len(c) for p, c in rows)
        sequences = torch.full((batch, width), EOS, dtype=torch.long)
        attention = torch.zeros(batch, width, dtype=torch.long)
        completion = torch.zeros(batch, width, dtype=torch.long)
        for row, (prompt, answer) in enumerate(rows):
            sequences[row, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
            attention[row, : len(prompt) + len(answer)] = 1
            completion[row, len(prompt) : len(prompt) + len(answer)] = 1
        scored = completion_logprobs(model, sequences, attention, completion)
        loss = -scored.sum.sum() / scored.count.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def held_out_scores(model: Transformer, tokenizer: Tokenizer, prompts: list[list[int]], samples: int, seed: int):
    """Mean true and proxy reward of sampled answers (temperature 1) to held-out prompts."""
    from genforge.align.rollout import generate_rollout
    from genforge.generate.sampling import SamplingParams

    rollout = generate_rollout(
        model, tokenizer, [prompt_ids(p) for p in prompts], samples, SamplingParams(max_new_tokens=16, seed=seed)
    )
    targets = [prompts[int(i)] for i in rollout.prompt_index]
    true = [true_reward(t, c) for t, c in zip(targets, rollout.completions)]
    fake = [proxy_reward(t, c) for t, c in zip(targets, rollout.completions)]
    exact = [answer_digits(c) == t for t, c in zip(targets, rollout.completions)]
    return {
        "true_reward": sum(true) / len(true),
        "proxy_reward": sum(fake) / len(fake),
        "exact_match": sum(exact) / len(exact),
    }


# --------------------------------------------------------------------------------------- PPO
def task_metrics(prompts, completions, completion_ids, digits):
    """The true reward of the samples the proxy scored (logged, never optimised)."""
    true = [true_reward(t, ids) for t, ids in zip(digits, completion_ids)]
    exact = [answer_digits(ids) == t for t, ids in zip(digits, completion_ids)]
    return {"true_reward": sum(true) / len(true), "exact_match": sum(exact) / len(exact)}


def ppo_run(sft: Transformer, tokenizer: Tokenizer, prompts: list[PromptRecord], args, out_dir: Path, **knobs):
    """(metrics per step, the trained model) of PPO on the proxy from a copy of the SFT model."""
    config = PPOConfig(
        out_dir=out_dir,
        steps=args.ppo_steps,
        prompts_per_step=args.prompts_per_step,
        max_new_tokens=16,
        ppo_epochs=4,
        minibatch_size=args.prompts_per_step // 2,
        lr=args.ppo_lr,
        method="full",
        seed=args.seed,
        progress=False,
        **knobs,
    )
    model = copy.deepcopy(sft)
    trainer = PPOTrainer(model, tokenizer, prompts, proxy, config, extra_metrics=task_metrics)
    trainer.train()
    return trainer.read_metrics(), model.eval()


# ------------------------------------------------------------------------------------ output
def write_plot(path: Path, runs: dict[str, list[dict]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 3.6))
    FigureCanvasAgg(figure)
    panels = (
        ("reward", "proxy reward (optimised)"),
        ("true_reward", "true task reward (not optimised)"),
        ("kl", "KL to the SFT model (nats/sample)"),
    )
    for column, (key, title) in enumerate(panels):
        axes = figure.add_subplot(1, 3, column + 1)
        for label, records in runs.items():
            axes.plot([r["step"] for r in records], [r[key] for r in records], label=label)
        axes.set_title(title)
        axes.set_xlabel("PPO step")
        if column == 0:
            axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")


def window_mean(records: list[dict], key: str, last: bool, size: int) -> float:
    part = records[-size:] if last else records[:size]
    return sum(r[key] for r in part) / len(part)


def markdown(result: dict) -> str:
    machine, settings = result["machine"], result["settings"]
    lines = [
        "# Reward hacking: PPO on a proxy reward, with and without the KL penalty",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} CPUs, {machine['threads']} torch thread(s), torch "
        f"{machine['torch']}, Python {machine['python']}. Wall time {result['seconds']:.0f} s.",
        "",
        "Command: `PYTHONPATH=src python benchmarks/reward_hacking.py`",
        "",
        f"SFT model: {result['sft']['parameters']:,} parameters, {settings['sft_steps']} steps on the copy task; "
        f"held-out (temperature-1 samples): true reward {result['sft']['held_out']['true_reward']:.3f}, exact "
        f"match {result['sft']['held_out']['exact_match']:.1%}, proxy {result['sft']['held_out']['proxy_reward']:.3f}.",
        "",
        f"PPO: {settings['ppo_steps']} steps of {settings['prompts_per_step']} prompts, all weights, lr "
        f"{settings['ppo_lr']}. Means over the first and the last {result['window']} steps (training samples), "
        "and on held-out prompts after training:",
        "",
        "| run | proxy first -> last | true first -> last | KL last (nats) | kl_coef last | held-out true | "
        "held-out exact | held-out proxy | answer tokens last |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in result["runs"].items():
        held = run["held_out"]
        lines.append(
            f"| {name} | {run['proxy_first']:.3f} -> {run['proxy_last']:.3f} | {run['true_first']:.3f} -> "
            f"{run['true_last']:.3f} | {run['kl_last']:.2f} | {run['kl_coef_last']:.4f} | {held['true_reward']:.3f} | "
            f"{held['exact_match']:.1%} | {held['proxy_reward']:.3f} | {run['tokens_last']:.1f} |"
        )
    lines += ["", "![proxy, true reward and KL per PPO step](reward_hacking.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sft-steps", type=int, default=150, help="short on purpose: the SFT model copies most, not all, strings"
    )
    parser.add_argument("--ppo-steps", type=int, default=40)
    parser.add_argument("--prompts-per-step", type=int, default=32)
    parser.add_argument("--ppo-lr", type=float, default=1e-4)
    parser.add_argument("--kl-coef", type=float, default=0.3, help="start value of the penalised run's kl_coef")
    parser.add_argument("--kl-target", type=float, default=0.5, help="the penalised run's KL target (nats/sample)")
    parser.add_argument("--kl-horizon", type=float, default=500.0, help="the adaptive controller's horizon (samples)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    tokenizer = digits_tokenizer()
    sft = build_model(args.seed)
    sft_losses = supervised_fine_tune(sft, args.sft_steps, batch=64, lr=3e-3, seed=args.seed)
    sft.eval()
    rng = random.Random(args.seed + 1)
    train_digits = [random_digits(rng) for _ in range(256)]
    held_digits = [random_digits(rng) for _ in range(64)]
    sft_held = held_out_scores(sft, tokenizer, held_digits, samples=4, seed=args.seed)
    print(f"SFT: final loss {sft_losses[-1]:.3f}; held-out {sft_held}", file=sys.stderr)
    prompts = [
        PromptRecord(prompt_ids(d), "".join(SYMBOLS[i] for i in d) + "=", {"digits": d}, f"train {n}")
        for n, d in enumerate(train_digits)
    ]

    runs, summaries, held = {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, knobs in (
            ("no KL penalty", {"kl_coef": 0.0}),
            (
                f"KL penalty (target {args.kl_target:g})",
                {"kl_coef": args.kl_coef, "kl_target": args.kl_target, "kl_horizon": args.kl_horizon},
            ),
        ):
            run_started = time.perf_counter()
            directory = Path(scratch) / str(len(runs))
            records, trained = ppo_run(sft, tokenizer, prompts, args, directory, **knobs)
            runs[name] = records
            held[name] = held_out_scores(trained, tokenizer, held_digits, samples=4, seed=args.seed)
            print(
                f"{name}: proxy {records[0]['reward']:.3f} -> {records[-1]['reward']:.3f}, true "
                f"{records[0]['true_reward']:.3f} -> {records[-1]['true_reward']:.3f}, KL {records[-1]['kl']:.2f} "
                f"({time.perf_counter() - run_started:.0f} s)",
                file=sys.stderr,
            )
    window = max(1, args.ppo_steps // 6)
    for name, records in runs.items():
        summaries[name] = {
            "proxy_first": window_mean(records, "reward", False, window),
            "proxy_last": window_mean(records, "reward", True, window),
            "true_first": window_mean(records, "true_reward", False, window),
            "true_last": window_mean(records, "true_reward", True, window),
            "kl_last": window_mean(records, "kl", True, window),
            "kl_coef_last": records[-1]["kl_coef"],
            "tokens_last": window_mean(records, "completion_tokens", True, window),
            "held_out": held[name],
            "steps": records,
        }
    out = Path(args.out)
    write_plot(out / "reward_hacking.png", runs)
    result = {
        "machine": describe(),
        "settings": vars(args),
        "seconds": time.perf_counter() - started,
        "window": window,
        "sft": {
            "parameters": sum(p.numel() for p in sft.parameters()),
            "final_loss": sft_losses[-1],
            "held_out": sft_held,
        },
        "runs": summaries,
    }
    write_results(out, "reward_hacking", result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
