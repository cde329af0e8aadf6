"""Reward-model training: a scalar head on a decoder, fitted to preference pairs with the
Bradley-Terry loss (the reward model of RLHF: Stiennon et al. 2020, Ouyang et al. 2022).

The model is `align.reward.RewardModel`: the decoder of a causal LM (its LM head dropped) with a
fresh `score` head, or a `...ForSequenceClassification` reward checkpoint to train further. Each
step scores the chosen and rejected sequences (prompt + completion) of its pairs in one forward
pass and minimises `losses.reward_model_loss`:

    -log sigmoid(r(x, y_w) - r(x, y_l) - m) + c (r(x, y_w) + r(x, y_l))^2,

with m an optional margin per pair (a record's "margin": how much surer the raters were, as in
Llama 2, Touvron et al. 2023) and c the reward-centring coefficient (Eisenstein et al. 2023),
which pins the scale Bradley-Terry leaves free. The run is the fine-tuning run's loop
(`genforge.train.Trainer` with a `StepObjective`: accumulation, clipping, AdamW with warmup and
cosine decay, checkpoints with exact resume, metrics.jsonl, torchrun) over the decoder with
`lora`, `dora` or `full` installed first; the head always trains.

Data: preference pairs in every shape `align.data` reads (prompt, chosen, rejected; plain
text or chat messages), each with an optional number "margin" (all records of a file or none).
A held-out share is scored before and after: pairwise accuracy (the share of pairs whose chosen
completion gets the higher reward; a tie counts as wrong) and the mean margin.

Output: `out_dir/model`, a reward model directory `RewardModel.from_pretrained` and transformers'
`AutoModelForSequenceClassification` load (adapters merged into the decoder first), with the
tokenizer; `reward.json` with the held-out scores before and after. The reward is read at the
last token that is not padding nor the pad token id (transformers' rule); the run sets the
model's `pad_token_id` from the tokenizer when the checkpoint has none, so transformers can
score padded batches of the saved model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write_text
from ..checkpoint import load_model, read_config
from ..jsonl import json_objects
from ..quantize.saved import read_quantization_config
from ..tokenizer import Tokenizer
from ..train.distributed import DistributedContext
from ..train.trainer import Trainer
from .data import OVERFLOW_MODES, PreferenceDataError, PreferenceDataset, PreferenceRows, parse_preference_record
from .losses import PreferenceLoss, reward_model_loss
from .preference import finetune_settings, flatten_pairs, train_settings
from .reward import SEQUENCE_CLASSIFIERS, RewardModel

REWARD_METHODS = ("lora", "dora", "full")
# The head starts from noise and must move far; TRL's RewardConfig default is 1e-4.
REWARD_LR = {"lora": 1e-4, "dora": 1e-4, "full": 1e-5}
SUMMARY_FILE = "reward.json"


class RewardTrainingError(ValueError):
    """A reward-model run that cannot start as asked."""


@dataclass
class RewardConfig:
    """What a reward-model run reads, trains and writes.

    model_dir: a causal LM directory (a fresh head is drawn) or a reward model directory (a
        `...ForSequenceClassification` with one label, trained further).
    center_rewards_coefficient: c of the centring term c (r_w + r_l)^2; None: no term (TRL's
        default; 0.01 is the usual value when it is used).
    Margins are read from the records (their "margin" field) when they carry one.
    The data, length, training and LoRA fields mean what `align.preference.PreferenceConfig`'s do.
    """

    model_dir: str | Path
    data: str | Path
    out_dir: str | Path
    method: str = "lora"
    center_rewards_coefficient: float | None = None
    eval_data: str | Path | None = None
    eval_fraction: float = 0.05
    max_length: int | None = None
    max_prompt_length: int | None = None
    overflow: str = "truncate"
    chat_template: str | None = None
    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    eval_every: int = 0
    save_every: int = 0
    seed: int = 0
    gradient_checkpointing: bool = False
    device: str = "cpu"
    progress: bool = True
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: Sequence[str] | None = None


def is_reward_checkpoint(directory: str | Path) -> bool:
    """Whether a model directory holds a sequence classifier (by config.json's architectures)."""
    try:
        architectures = json.loads((Path(directory) / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        return False
    return any(str(name).endswith("ForSequenceClassification") for name in architectures)


def check_config(config: RewardConfig) -> None:
    """Everything that can be checked before the data is read or the model loaded."""
    if config.method not in REWARD_METHODS:
        raise RewardTrainingError(
            f"unknown method {config.method!r} for a reward model; accepted: {', '.join(REWARD_METHODS)} "
            "(the head is a new layer, so the quantized base of qlora is not offered)"
        )
    if not (Path(config.model_dir) / "config.json").is_file():
        raise RewardTrainingError(f"model {config.model_dir} is not a Hugging Face model directory (no config.json)")
    if read_quantization_config(config.model_dir) is not None:
        raise RewardTrainingError(f"{config.model_dir} is a quantized model; train the floating-point model")
    family = read_config(config.model_dir).family
    if family not in SEQUENCE_CLASSIFIERS:
        raise RewardTrainingError(
            f"{config.model_dir} is a {family} model; a reward model needs a decoder family with a sequence "
            f"classifier ({', '.join(SEQUENCE_CLASSIFIERS)})"
        )
    for path in (config.data, config.eval_data):
        if path is not None and not Path(path).is_file():
            raise RewardTrainingError(f"data file {path} does not exist")
    if not 0 <= config.eval_fraction < 1:
        raise RewardTrainingError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}")
    if config.overflow not in OVERFLOW_MODES:
        raise RewardTrainingError(f"overflow must be one of {OVERFLOW_MODES}, got {config.overflow!r}")
    coefficient = config.center_rewards_coefficient
    if coefficient is not None and not (
        isinstance(coefficient, (int, float)) and math.isfinite(coefficient) and coefficient >= 0
    ):
        raise RewardTrainingError(f"center_rewards_coefficient must be a number >= 0 or None, got {coefficient!r}")


# ---------------------------------------------------------------------------------- the data
def _margin(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PreferenceDataError(f"{where}: 'margin' must be a finite number, got {value!r}")
    return float(value)


def read_reward_records(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, parsed pair) for each line of a JSONL file, as `align.data.read_preference_records`
    gives them plus "margin" (a float, or None when the file's records carry none). Every
    record is checked before anything is returned; a file mixing records with and without a
    margin is refused, naming the first without."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as handle:
        for line, record in json_objects(handle, str(path), PreferenceDataError):
            where = f"{path}:{line}"
            parsed = parse_preference_record(record, where)
            parsed["margin"] = _margin(record["margin"], where) if "margin" in record else None
            records.append((where, parsed))
    if not records:
        raise PreferenceDataError(f"{path}: holds no records; expected one preference pair per line")
    without = [where for where, parsed in records if parsed["margin"] is None]
    if without and len(without) != len(records):
        raise PreferenceDataError(
            f"{without[0]}: has no 'margin' while other records of {path} have one; give every pair a margin or none"
        )
    return records


class RewardRows(PreferenceRows):
    """Preference pairs as the trainer's batch source (`PreferenceRows`' layout), plus each
    pair's margin (`margin`, (pairs,)) when the records carry margins."""

    def __init__(self, pairs, pad_id: int, margins: Sequence[float] | None = None) -> None:
        super().__init__(pairs, pad_id)
        if margins is not None and len(margins) != len(self.pairs):
            raise PreferenceDataError(f"{len(margins)} margins for {len(self.pairs)} pairs; give one per pair")
        self.margins = torch.tensor(list(margins), dtype=torch.float32) if margins is not None else None

    def batch(self, indices: Iterable[int]) -> dict[str, torch.Tensor]:
        indices = [int(i) for i in indices]
        batch = super().batch(indices)
        if self.margins is not None:
            batch["margin"] = self.margins[torch.tensor(indices)]
        return batch


# ----------------------------------------------------------------------------- the objective
class RewardObjective:
    """The step objective (`genforge.train.StepObjective`) of the Bradley-Terry reward loss."""

    def __init__(self, center_rewards_coefficient: float | None = None) -> None:
        self.center_rewards_coefficient = center_rewards_coefficient

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    @staticmethod
    def pair_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) rewards (pairs,) of a `RewardRows` batch, in one forward pass."""
        rewards = model(flatten_pairs(batch["input_ids"]), attention_mask=flatten_pairs(batch["attention_mask"]))
        half = batch["input_ids"].shape[0]
        return rewards[:half].float(), rewards[half:].float()

    def pair_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> PreferenceLoss:
        chosen, rejected = self.pair_rewards(model, batch)
        return reward_model_loss(chosen, rejected, batch.get("margin"), self.center_rewards_coefficient)

    def micro_loss(self, engine, model, batch, total_weight):
        result = self.pair_loss(engine, batch)
        return result.losses.sum() / total_weight, {
            name: value / total_weight for name, value in _reward_sums(result).items()
        }

    @torch.no_grad()
    def evaluate(self, model, data: RewardRows, batch_size: int) -> dict[str, float]:
        device = model.score.weight.device
        sums: dict[str, float] = {}
        losses = 0.0
        for start in range(0, len(data), batch_size):
            batch = data.batch(range(start, min(start + batch_size, len(data))))
            result = self.pair_loss(model, {name: tensor.to(device) for name, tensor in batch.items()})
            losses += float(result.losses.sum())
            for name, value in _reward_sums(result).items():
                sums[name] = sums.get(name, 0.0) + value
        count = len(data)
        return {"val_loss": losses / count, **{f"val_{name}": value / count for name, value in sums.items()}}


def _reward_sums(result: PreferenceLoss) -> dict[str, float]:
    """Sums over the pairs, named as the preference trainer names its implicit rewards."""
    chosen, rejected = result.chosen_rewards, result.rejected_rewards
    return {
        "rewards/chosen": float(chosen.sum()),
        "rewards/rejected": float(rejected.sum()),
        "rewards/margins": float((chosen - rejected).sum()),
        "rewards/accuracies": float((chosen > rejected).float().sum()),
    }


# ------------------------------------------------------------------------------------ the run
@dataclass
class RewardResult:
    method: str
    output_dir: Path
    trainable_parameters: int
    total_parameters: int
    train_pairs: int
    held_out_pairs: int
    truncated_pairs: int
    before: dict | None
    after: dict | None
    steps: int
    tokens_per_s: float
    peak_rss_mib: float
    seconds: float
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        record = asdict(self)
        record["output_dir"] = str(self.output_dir)
        return record


def _load_reward_model(config: RewardConfig, tokenizer: Tokenizer) -> RewardModel:
    """The model to train: a reward checkpoint as saved, or a causal LM's decoder with a new
    head (seeded, so every rank and every resumed run draws the same one)."""
    if is_reward_checkpoint(config.model_dir):
        model = RewardModel.from_pretrained(config.model_dir, dtype=torch.float32)
    else:
        torch.manual_seed(config.seed)
        model = RewardModel(load_model(config.model_dir, dtype=torch.float32))
    if model.config.pad_token_id is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model.config.pad_token_id = pad  # read by the model's last-token rule here and in transformers
    return model


def _install_method(model: RewardModel, config: RewardConfig, tokenizer: Tokenizer) -> RewardModel:
    from ..finetune.run import METHODS

    if config.method == "full":
        model.requires_grad_(True)
        return model
    settings = finetune_settings(config)
    torch.manual_seed(config.seed)  # the adapter's initial weights
    METHODS[config.method].install(model.decoder, settings, tokenizer)
    model.score.requires_grad_(True)  # the head is new: it always trains (PEFT's modules_to_save)
    return model


def _pairs(config: RewardConfig, tokenizer: Tokenizer, max_length: int):
    """(training rows, held-out rows or None, pairs whose prompt was cut)."""
    from ..finetune.run import split_held_out

    records = read_reward_records(config.data)
    held = read_reward_records(config.eval_data) if config.eval_data is not None else None
    if held is None:
        records, held = split_held_out(records, config.eval_fraction, config.seed)
    limits = dict(
        max_length=max_length,
        max_prompt_length=config.max_prompt_length,
        overflow=config.overflow,
        chat_template=config.chat_template,
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def rows(part):
        if not part:
            return None, 0
        dataset = PreferenceDataset.from_records(part, tokenizer, **limits)
        margins = [parsed["margin"] for _, parsed in part]
        return RewardRows(dataset.pairs, pad, None if margins[0] is None else margins), dataset.truncated_pairs

    (train, cut_train), (held_out, cut_held) = rows(records), rows(held)
    if train is None:
        raise RewardTrainingError(f"{config.data} leaves no pairs to train on")
    return train, held_out, cut_train + cut_held


def train_reward_model(
    config: RewardConfig, resume: bool = False, distributed: DistributedContext | None = None
) -> RewardResult:
    """Run `config` (see the module doc); resume=True continues the run in `out_dir`. Writes
    `out_dir/model` (the reward model), the trainer's files (checkpoints, metrics.jsonl,
    loss_curve.png) and `reward.json`. Under torchrun rank 0 writes the files."""
    from ..finetune.lora import merge_and_unload, trainable_parameter_count
    from ..finetune.run import _peak_rss_mib

    check_config(config)
    started = time.perf_counter()
    out_dir = Path(config.out_dir)
    tokenizer = Tokenizer.from_dir(config.model_dir)
    max_length = config.max_length or min(1024, read_config(config.model_dir).max_position_embeddings)
    rows, val_rows, truncated = _pairs(config, tokenizer, max_length)
    if truncated:
        warnings.warn(
            f"{config.data}: cut the prompts of {truncated} pairs from the left to fit max_length={max_length}, "
            f"max_prompt_length={config.max_prompt_length}",
            stacklevel=2,
        )
    model = _install_method(_load_reward_model(config, tokenizer), config, tokenizer)
    trainable, total = trainable_parameter_count(model)
    train_config = train_settings(config, out_dir, REWARD_LR[config.method])
    trainer = Trainer(
        model,
        rows,
        train_config,
        val_data=val_rows,
        tokenizer=tokenizer,
        distributed=distributed,
        objective=RewardObjective(config.center_rewards_coefficient),
    )
    summary_path = out_dir / SUMMARY_FILE
    before = None
    if val_rows is not None:
        if resume and summary_path.exists():
            before = json.loads(summary_path.read_text()).get("before")
        else:
            before = trainer.evaluate()
    if trainer.distributed.is_main and not resume:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(summary_path, json.dumps({"before": before}, indent=2))
    result = trainer.train(resume=resume)
    after = result.evals[-1] if result.evals else None
    output_dir = out_dir / "model"
    if trainer.distributed.is_main:
        if config.method != "full":
            merge_and_unload(model.decoder)  # a plain decoder: what both loaders read
        model.save_pretrained(output_dir, tokenizer)
    records = [r for r in trainer.read_metrics() if "tokens_per_s" in r]
    outcome = RewardResult(
        method=config.method,
        output_dir=output_dir,
        trainable_parameters=trainable,
        total_parameters=total,
        train_pairs=len(rows),
        held_out_pairs=len(val_rows) if val_rows is not None else 0,
        truncated_pairs=truncated,
        before=before,
        after=after,
        steps=result.step,
        tokens_per_s=sum(r["tokens_per_s"] for r in records) / len(records) if records else 0.0,
        peak_rss_mib=_peak_rss_mib(),
        seconds=time.perf_counter() - started,
        settings={
            "lr": train_config.lr,
            "center_rewards_coefficient": config.center_rewards_coefficient,
            "margins": rows.margins is not None,
            "max_length": max_length,
            "max_prompt_length": config.max_prompt_length,
            "pad_token_id": model.config.pad_token_id,
        },
    )
    if trainer.distributed.is_main:
        atomic_write_text(summary_path, json.dumps(outcome.to_json(), indent=2))
    return outcome


# ---------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`genforge align reward`'s flags."""
    from .flags import add_length_arguments, add_run_arguments, add_shared_training_arguments

    parser.description = (
        "Train a reward model on JSONL preference pairs {'prompt', 'chosen', 'rejected'} (plain text or chat "
        "messages; an optional number 'margin' per pair) with the Bradley-Terry loss -log sigmoid(r_w - r_l - "
        "margin) + c (r_w + r_l)^2. --model is a causal LM (a new scalar head is put on its decoder) or a reward "
        "model to train further. Writes OUT/model, a reward model that genforge.align.RewardModel and "
        "transformers' AutoModelForSequenceClassification load (adapters merged), metrics.jsonl with rewards "
        "and pairwise accuracy per step, and reward.json with the held-out accuracy before and after. "
        "Interrupted runs continue with --resume; under torchrun every rank trains its slice of each batch."
    )
    parser.epilog = "example: genforge align reward --model sft-model/ --data pairs.jsonl --out runs/rm --steps 200"
    add_run_arguments(
        parser, "JSONL preference pairs (optional 'margin')", REWARD_METHODS, "what to train; the head always trains"
    )
    knobs = parser.add_argument_group("the loss")
    knobs.add_argument(
        "--center-rewards-coefficient",
        type=float,
        help="c of the centring term c (r_w + r_l)^2 that keeps rewards near 0 (default: none; 0.01 is usual)",
    )
    add_length_arguments(parser)
    add_shared_training_arguments(parser, "pairs", "peak learning rate (default: 1e-4 for adapters, 1e-5 for full)")


def run(args: argparse.Namespace) -> int:
    """`genforge align reward`: train, report one line on stderr and the result as JSON on stdout."""
    from ..console import console
    from .flags import launch, training_fields

    config = RewardConfig(**training_fields(args), center_rewards_coefficient=args.center_rewards_coefficient)
    result, context = launch(train_reward_model, config, check_config, args.resume)
    if context.is_main:

        def scores(evaluation) -> str:
            if not evaluation:
                return "n/a"
            return (
                f"accuracy {evaluation['val_rewards/accuracies']:.1%}, margin {evaluation['val_rewards/margins']:+.3f}"
            )

        console.print(
            f"reward ({result.method}): trained {result.trainable_parameters:,} of {result.total_parameters:,} "
            f"parameters for {result.steps} steps on {result.train_pairs:,} pairs; held-out ({result.held_out_pairs} "
            f"pairs) {scores(result.before)} -> {scores(result.after)}; {result.tokens_per_s:,.0f} tok/s; wrote "
            f"{result.output_dir}"
        )
        print(json.dumps(result.to_json()))
    return 0


__all__ = [
    "REWARD_METHODS",
    "RewardConfig",
    "RewardObjective",
    "RewardResult",
    "RewardRows",
    "RewardTrainingError",
    "add_arguments",
    "check_config",
    "is_reward_checkpoint",
    "read_reward_records",
    "run",
    "train_reward_model",
]
