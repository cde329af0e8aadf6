"""Hyperparameter search: short training runs chosen by Optuna, bad ones stopped early.

Each trial trains the model from the same initial weights for a few hundred steps with values
drawn from the search space (TPE, Bergstra et al. 2011), reports its validation loss at every
evaluation, and is pruned when that loss is worse than the median of earlier trials at the same
step (Optuna's MedianPruner; successive halving is the other common choice). The study lives in
a SQLite file in the output directory, so an interrupted search continues where it stopped.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from ..atomic import atomic_path, atomic_write_text
from .trainer import TrainConfig, Trainer

KINDS = ("float", "log", "int", "choice")
# TrainConfig fields a search may set (numbers a short run is sensitive to).
TUNABLE = (
    "lr",
    "min_lr_ratio",
    "warmup_steps",
    "weight_decay",
    "batch_size",
    "grad_accum",
    "grad_clip",
    "label_smoothing",
    "adam_eps",
    "scheduled_sampling",
)


class TuneError(ValueError):
    """A search space or tuning run genforge cannot use; the message says what is accepted."""


@dataclass(frozen=True)
class Dimension:
    """One searched field: `lr=log:1e-4:3e-3`, `warmup_steps=int:0:50`, `batch_size=choice:4,8,16`."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "log")


def parse_space(specs: list[str]) -> list[Dimension]:
    """`NAME=KIND:LOW:HIGH` or `NAME=choice:A,B,C` for each searched TrainConfig field."""
    dimensions = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        kind, _, bounds = rest.partition(":")
        if not sep or kind not in KINDS:
            raise TuneError(f"search dimension {spec!r}: write NAME=KIND:LOW:HIGH or NAME=choice:A,B (KIND: {KINDS})")
        if name not in TUNABLE:
            raise TuneError(f"{name!r} cannot be searched; searchable fields: {', '.join(TUNABLE)}")
        if kind == "choice":
            values = tuple(_number(v) for v in bounds.split(",") if v)
            if len(values) < 2:
                raise TuneError(f"{spec!r}: give at least two choices")
            dimensions.append(Dimension(name, kind, choices=values))
            continue
        parts = bounds.split(":")
        if len(parts) != 2:
            raise TuneError(f"{spec!r}: give LOW:HIGH")
        low, high = (_number(p) for p in parts)
        if not low < high or (kind == "log" and low <= 0):
            raise TuneError(f"{spec!r}: need LOW < HIGH (and LOW > 0 for log)")
        dimensions.append(Dimension(name, kind, float(low), float(high)))
    names = [d.name for d in dimensions]
    if len(set(names)) != len(names) or not names:
        raise TuneError("give each searched field once, and at least one")
    return dimensions


def _number(text: str) -> float | int:
    try:
        value = float(text)
    except ValueError:
        raise TuneError(f"{text!r} is not a number") from None
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


@dataclass
class TuneResult:
    best_params: dict
    best_value: float
    trials: list[dict]  # number, state, value, params, steps trained
    out_dir: Path


def tune(
    build_model: Callable[[], torch.nn.Module],
    train_data,
    val_data,
    base: TrainConfig,
    space: list[Dimension],
    trials: int,
    out_dir: str | Path,
    eval_every: int,
    seed: int = 0,
    prune: bool = True,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Run `trials` short trainings (each `base.max_steps` steps, evaluated every `eval_every`),
    and write `study.db`, `trials.csv`, `trials.md` and `best_config.json` to `out_dir`."""
    import optuna

    if trials < 1 or eval_every < 1 or eval_every > base.max_steps:
        raise TuneError("need trials >= 1 and 1 <= eval_every <= steps")
    for dimension in space:
        if dimension.kind != "choice" and dimension.name in ("warmup_steps",) and dimension.high > base.max_steps:
            raise TuneError(f"warmup_steps may not exceed the {base.max_steps} steps of a trial")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name="genforge-tune",
        storage=f"sqlite:///{out_dir / 'study.db'}",
        load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
        if prune
        else optuna.pruners.NopPruner(),
    )
    initial = copy.deepcopy(build_model().state_dict())

    def objective(trial) -> float:
        params = {dimension.name: dimension.suggest(trial) for dimension in space}
        config = replace(base, out_dir=out_dir / f"trial-{trial.number:03d}", progress=False, export=False, **params)
        model = build_model()
        model.load_state_dict(initial)
        trainer = Trainer(model, train_data, config, val_data=val_data)
        loss = math.inf
        for step in range(1, config.max_steps + 1):
            trainer.train_step(trainer._next_batches())
            if step % eval_every == 0 or step == config.max_steps:
                loss = trainer.evaluate()["val_loss"]
                if not math.isfinite(loss):
                    raise optuna.TrialPruned()
                trial.report(loss, step)
                trial.set_user_attr("steps", step)
                if trial.should_prune():
                    raise optuna.TrialPruned()
        return loss

    done = len([t for t in study.trials if t.state.is_finished()])
    for _ in range(max(0, trials - done)):
        study.optimize(objective, n_trials=1, catch=(RuntimeError,))
        last = study.trials[-1]
        if progress:
            value = f"{last.value:.4f}" if last.value is not None else "-"
            progress(f"trial {last.number}: {last.state.name.lower()} val loss {value} {last.params}")
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not finished:
        raise TuneError("no trial finished (all were pruned or failed); widen the space or run more trials")
    records = [
        {
            "number": t.number,
            "state": t.state.name.lower(),
            "value": t.value,
            "steps": t.user_attrs.get("steps"),
            **t.params,
        }
        for t in study.trials
    ]
    result = TuneResult(study.best_params, study.best_value, records, out_dir)
    _write_results(result, base, space)
    return result


def _write_results(result: TuneResult, base: TrainConfig, space: list[Dimension]) -> None:
    names = [d.name for d in space]
    with atomic_path(result.out_dir / "trials.csv") as staged:
        with open(staged, "w", newline="") as handle:
            writer = csv.DictWriter(handle, ["number", "state", "value", "steps", *names])
            writer.writeheader()
            writer.writerows(result.trials)
    header = "| trial | state | val loss | steps | " + " | ".join(names) + " |"
    rows = [header, "|" + "---|" * (4 + len(names))]
    for t in sorted(result.trials, key=lambda r: (r["value"] is None, r["value"] or 0)):
        value = f"{t['value']:.4f}" if t["value"] is not None else "-"
        cells = [_cell(t.get(name)) for name in names]
        rows.append(f"| {t['number']} | {t['state']} | {value} | {t['steps']} | " + " | ".join(cells) + " |")
    atomic_write_text(result.out_dir / "trials.md", "\n".join(rows) + "\n")
    tunable = {f.name for f in fields(TrainConfig)} & set(TUNABLE)
    best = {name: getattr(base, name) for name in sorted(tunable)} | result.best_params
    atomic_write_text(
        result.out_dir / "best_config.json",
        json.dumps({"val_loss": result.best_value, "steps": base.max_steps, "train_config": best}, indent=2) + "\n",
    )


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)
