"""The preference trainer: direct alignment from pairs (prompt, chosen, rejected), the DPO
family and the reference-free ORPO and SimPO (losses and papers in `align.losses`).

The run is the fine-tuning run's loop (`genforge.train.Trainer`: accumulation, clipping,
AdamW with warmup and cosine decay, checkpoints with exact resume, trainable-only checkpoints
for adapters, progress, loss curve, torchrun) with a `StepObjective` in place of the
token-level loss, and the fine-tuning run's methods (`finetune.run.METHODS`: full, LoRA,
DoRA, QLoRA) installed first.

- Each step scores the chosen and rejected sequences of its pairs in one forward pass (the
  two stacked as one batch) with completion-only log-probabilities (`align.logprobs`).
- The reference model's log-probabilities are computed once, before the first step, for every
  training and held-out pair, and kept with the data; they are also written to
  `out_dir/reference_logps.safetensors`, so a resumed run reads them instead of recomputing.
  With an adapter the reference is the base model with the adapters switched off
  (`finetune.lora.disabled_adapters`): no second copy of the weights. With full fine-tuning it
  is the loaded model before its first step, which is what a frozen copy would compute, so no
  copy is held either; `reference_model` names another model directory to use instead (it is
  loaded, scores the pairs, and is freed before training).
- Logged per step (metrics.jsonl): the loss, the mean chosen and rejected rewards (beta times
  the policy/reference log-ratio, or for ORPO and SimPO beta times the mean log-probability),
  their margin and the reward accuracy (the share of pairs whose chosen reward is higher), as
  TRL names them (`rewards/chosen`, ...). Held-out pairs are scored before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_path, atomic_write_text
from ..checkpoint import load_model, read_config
from ..quantize.saved import read_quantization_config
from ..tokenizer import Tokenizer
from ..train.distributed import DistributedContext
from ..train.trainer import TrainConfig, Trainer
from .data import (
    OVERFLOW_MODES,
    PreferenceDataError,
    PreferenceDataset,
    PreferenceRows,
    pairs_fingerprint,
    read_preference_records,
)
from .logprobs import CompletionLogProbs, completion_logprobs
from .losses import PreferenceLoss, dpo_loss, orpo_loss, simpo_loss


class PreferenceError(ValueError):
    """A preference run that cannot start as asked."""


@dataclass(frozen=True)
class PreferenceLossSpec:
    """How a named loss is computed: the `dpo_loss` type (None: ORPO or SimPO), whether it needs
    a reference model, its usual beta, and whether label smoothing is its point."""

    summary: str
    dpo_type: str | None
    beta: float
    reference: bool = True
    smoothing: bool = False


PREFERENCE_LOSSES: dict[str, PreferenceLossSpec] = {
    "dpo": PreferenceLossSpec("-log sigmoid(beta * margin of log-ratios) (Rafailov et al. 2023)", "sigmoid", 0.1),
    "ipo": PreferenceLossSpec(
        "(per-token margin - 1/(2 beta))^2: a fixed target, no over-fitting to certain pairs (Azar et al. 2023)",
        "ipo",
        0.1,
    ),
    "cdpo": PreferenceLossSpec(
        "conservative DPO: a --label-smoothing share of labels assumed flipped (Mitchell 2023)",
        "sigmoid",
        0.1,
        smoothing=True,
    ),
    "hinge": PreferenceLossSpec("max(0, 1 - beta * margin) (SLiC, Zhao et al. 2023)", "hinge", 0.1),
    "robust": PreferenceLossSpec(
        "unbiased under a --label-smoothing rate of label noise (Chowdhury et al. 2024)", "robust", 0.1, smoothing=True
    ),
    "orpo": PreferenceLossSpec(
        "SFT loss on chosen + beta * odds-ratio term; no reference model (Hong et al. 2024)", None, 0.1, reference=False
    ),
    "simpo": PreferenceLossSpec(
        "-log sigmoid(beta * mean log-prob margin - gamma); no reference model (Meng et al. 2024)",
        None,
        2.0,
        reference=False,
    ),
}
# The fine-tuning methods a preference run trains with; their learning rates are DPO's usual
# ones (TRL's examples: 5e-7..1e-6 for all weights, 5e-6..5e-5 for adapters).
PREFERENCE_METHODS = ("lora", "dora", "qlora", "full")
PREFERENCE_LR = {"full": 1e-6, "lora": 5e-5, "dora": 5e-5, "qlora": 5e-5}
REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class PreferenceConfig:
    """What a preference run reads, trains and writes.

    loss: one of `PREFERENCE_LOSSES`. beta: None takes the loss's usual value (0.1; SimPO 2.0).
    label_smoothing: cdpo's and robust's assumed share of flipped labels (default 0.1 for them,
        0 otherwise; SimPO takes it too). gamma: SimPO's target margin.
    max_length: tokens of prompt + the longer completion (default: the model's context, at most
        1024); max_prompt_length: tokens of the prompt. Prompts are cut from the left to fit, or
        the pair refused with overflow="error"; completions are never cut (see `align.data`).
    reference_model: a model directory to take the reference log-probabilities from (same
        tokenizer); None: the loaded model before training (adapters off).
    The training and LoRA fields mean what `finetune.run.FinetuneConfig`'s do.
    """

    model_dir: str | Path
    data: str | Path
    out_dir: str | Path
    loss: str = "dpo"
    method: str = "lora"
    beta: float | None = None
    label_smoothing: float | None = None
    gamma: float = 0.5
    eval_data: str | Path | None = None
    eval_fraction: float = 0.05
    max_length: int | None = None
    max_prompt_length: int | None = None
    overflow: str = "truncate"
    chat_template: str | None = None
    reference_model: str | Path | None = None
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

    @property
    def spec(self) -> PreferenceLossSpec:
        return PREFERENCE_LOSSES[self.loss]

    @property
    def resolved_beta(self) -> float:
        return self.spec.beta if self.beta is None else self.beta

    @property
    def resolved_label_smoothing(self) -> float:
        if self.label_smoothing is not None:
            return self.label_smoothing
        return 0.1 if self.spec.smoothing else 0.0


def check_config(config: PreferenceConfig) -> None:
    """Everything that can be checked before the model or the data is read."""
    if config.loss not in PREFERENCE_LOSSES:
        raise PreferenceError(f"unknown preference loss {config.loss!r}; accepted: {', '.join(PREFERENCE_LOSSES)}")
    if config.method not in PREFERENCE_METHODS:
        raise PreferenceError(f"unknown method {config.method!r}; accepted: {', '.join(PREFERENCE_METHODS)}")
    for name, directory in (("model", config.model_dir), ("reference model", config.reference_model)):
        if directory is not None and not (Path(directory) / "config.json").is_file():
            raise PreferenceError(f"{name} {directory} is not a Hugging Face model directory (no config.json)")
    if read_quantization_config(config.model_dir) is not None:
        raise PreferenceError(
            f"{config.model_dir} is a quantized model; align the floating-point model (or use --method qlora on it)"
        )
    for path in (config.data, config.eval_data):
        if path is not None and not Path(path).is_file():
            raise PreferenceError(f"data file {path} does not exist")
    if not 0 <= config.eval_fraction < 1:
        raise PreferenceError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}")
    if config.overflow not in OVERFLOW_MODES:
        raise PreferenceError(f"overflow must be one of {OVERFLOW_MODES}, got {config.overflow!r}")
    beta, smoothing = config.resolved_beta, config.resolved_label_smoothing
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise PreferenceError(f"beta must be a finite number > 0, got {beta!r}")
    if not 0 <= smoothing < 0.5:
        raise PreferenceError(f"label_smoothing must be in [0, 0.5), got {smoothing}")
    takes_smoothing = config.spec.smoothing or config.loss == "simpo"
    if smoothing and not takes_smoothing:
        raise PreferenceError(
            f"label_smoothing applies to cdpo, robust and simpo, not to {config.loss}; for conservative DPO use cdpo"
        )
    if config.spec.smoothing and smoothing == 0:
        raise PreferenceError(f"{config.loss} needs label_smoothing > 0 (with 0 it is plain dpo)")
    if not (math.isfinite(config.gamma) and config.gamma >= 0):
        raise PreferenceError(f"gamma (SimPO's target margin) must be >= 0, got {config.gamma}")
    if config.reference_model is not None and not config.spec.reference:
        raise PreferenceError(f"{config.loss} uses no reference model; leave reference_model out")


# ----------------------------------------------------------------------------- the objective
def flatten_pairs(tensor: torch.Tensor) -> torch.Tensor:
    """(pairs, 2, ...) -> (2 * pairs, ...): every chosen row, then every rejected row, so the
    two halves of one forward pass are the chosen and the rejected batch."""
    return tensor.transpose(0, 1).reshape(-1, *tensor.shape[2:])


def pair_logprobs(model: nn.Module, batch: dict[str, torch.Tensor], lm_head: nn.Module | None = None):
    """(chosen, rejected) `CompletionLogProbs` of a `PreferenceRows` batch, in one forward pass."""
    scored = completion_logprobs(
        model,
        flatten_pairs(batch["input_ids"]),
        flatten_pairs(batch["attention_mask"]),
        flatten_pairs(batch["completion_mask"]),
        lm_head=lm_head,
    )
    half = batch["input_ids"].shape[0]

    def part(rows: slice) -> CompletionLogProbs:
        return CompletionLogProbs(scored.per_token[rows], scored.sum[rows], scored.count[rows])

    return part(slice(None, half)), part(slice(half, None))


class PreferenceObjective:
    """The step objective (`genforge.train.StepObjective`) of a preference loss."""

    def __init__(self, loss: str, beta: float, label_smoothing: float = 0.0, gamma: float = 0.5) -> None:
        self.loss, self.spec = loss, PREFERENCE_LOSSES[loss]
        self.beta, self.label_smoothing, self.gamma = beta, label_smoothing, gamma

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["input_ids"].shape[0])

    def pair_loss(self, chosen: CompletionLogProbs, rejected: CompletionLogProbs, batch) -> PreferenceLoss:
        if self.spec.dpo_type is not None:
            reference = batch.get("reference_logps")
            if reference is None:
                raise PreferenceError(f"{self.loss} needs the reference log-probabilities; none are set on the data")
            return dpo_loss(
                chosen.sum,
                rejected.sum,
                reference[:, 0],
                reference[:, 1],
                beta=self.beta,
                loss_type=self.spec.dpo_type,
                label_smoothing=self.label_smoothing,
                chosen_lengths=chosen.count,
                rejected_lengths=rejected.count,
            )
        if self.loss == "orpo":
            # The SFT term is each chosen completion's mean negative log-likelihood.
            return orpo_loss(chosen.mean, rejected.mean, beta=self.beta, chosen_nll=-chosen.mean)
        return simpo_loss(chosen.mean, rejected.mean, self.beta, self.gamma, self.label_smoothing)

    def micro_loss(self, engine, model, batch, total_weight):
        chosen, rejected = pair_logprobs(engine, batch, lm_head=model.lm_head)
        result = self.pair_loss(chosen, rejected, batch)
        return result.losses.sum() / total_weight, {
            name: float(value) / total_weight for name, value in _reward_sums(result).items()
        }

    @torch.no_grad()
    def evaluate(self, model, data: PreferenceRows, batch_size: int) -> dict[str, float]:
        sums: dict[str, float] = {}
        losses = 0.0
        for start in range(0, len(data), batch_size):
            batch = data.batch(range(start, min(start + batch_size, len(data))))
            batch = {name: tensor.to(model.lm_head.weight.device) for name, tensor in batch.items()}
            result = self.pair_loss(*pair_logprobs(model, batch), batch)
            losses += float(result.losses.sum())
            for name, value in _reward_sums(result).items():
                sums[name] = sums.get(name, 0.0) + value
        count = len(data)
        return {"val_loss": losses / count, **{f"val_{name}": value / count for name, value in sums.items()}}


def _reward_sums(result: PreferenceLoss) -> dict[str, float]:
    chosen, rejected = result.chosen_rewards, result.rejected_rewards
    return {
        "rewards/chosen": float(chosen.sum()),
        "rewards/rejected": float(rejected.sum()),
        "rewards/margins": float((chosen - rejected).sum()),
        "rewards/accuracies": float((chosen > rejected).float().sum()),
    }


@torch.no_grad()
def reference_logprobs(model: nn.Module, rows: PreferenceRows, batch_size: int = 8) -> torch.Tensor:
    """(pairs, 2) summed completion log-probabilities of `model` (in eval mode) for every pair:
    chosen, rejected. With LoRA layers they are switched off, so this scores the base model."""
    from ..finetune.lora import LoraLinear, disabled_adapters

    was_training = model.training
    model.eval()
    adapted = any(isinstance(module, LoraLinear) for module in model.modules())
    device = model.lm_head.weight.device
    scores = []
    try:
        with disabled_adapters(model) if adapted else contextlib.nullcontext():
            for start in range(0, len(rows), batch_size):
                batch = rows.batch(range(start, min(start + batch_size, len(rows))))
                batch = {name: tensor.to(device) for name, tensor in batch.items() if name != "reference_logps"}
                chosen, rejected = pair_logprobs(model, batch)
                scores.append(torch.stack([chosen.sum, rejected.sum], dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores)


# ------------------------------------------------------------------------------------ the run
@dataclass
class PreferenceResult:
    loss: str
    method: str
    output_dir: Path
    trainable_parameters: int
    total_parameters: int
    train_pairs: int
    held_out_pairs: int
    truncated_pairs: int
    truncated_prompt_tokens: int
    before: dict | None
    after: dict | None
    steps: int
    tokens_per_s: float
    peak_rss_mib: float
    reference_seconds: float
    seconds: float
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        record = asdict(self)
        record["output_dir"] = str(self.output_dir)
        return record


def finetune_settings(config):
    """The fine-tuning run's config (method and LoRA knobs) of an alignment run's config, for
    the method installers and savers. Preference, KTO and reward-model configs share the fields."""
    from ..finetune.run import FinetuneConfig

    return FinetuneConfig(
        model_dir=config.model_dir,
        data=config.data,
        out_dir=config.out_dir,
        method=config.method,
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        target_modules=config.target_modules,
    )


def train_settings(config, out_dir: Path, default_lr: float) -> TrainConfig:
    """The training loop's config of an alignment run's config (the loop's own fields, shared by
    the preference, KTO and reward-model configs); `default_lr` where the run gives none."""
    return TrainConfig(
        out_dir=out_dir,
        max_steps=config.max_steps,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        lr=config.lr if config.lr is not None else default_lr,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        grad_clip=config.grad_clip,
        eval_every=config.eval_every,
        save_every=config.save_every,
        seed=config.seed,
        gradient_checkpointing=config.gradient_checkpointing,
        device=config.device,
        progress=config.progress,
        export=False,
    )


def _pairs(config: PreferenceConfig, tokenizer: Tokenizer, max_length: int):
    """(training pairs, held-out pairs) as `PreferenceDataset`s: every record of every file is
    checked before any is tokenized."""
    from ..finetune.run import split_held_out

    records = read_preference_records(config.data)
    held_records = read_preference_records(config.eval_data) if config.eval_data is not None else None
    if held_records is None:
        records, held_records = split_held_out(records, config.eval_fraction, config.seed)
    limits = dict(
        max_length=max_length,
        max_prompt_length=config.max_prompt_length,
        overflow=config.overflow,
        chat_template=config.chat_template,
    )
    train = PreferenceDataset.from_records(records, tokenizer, **limits)
    held_out = PreferenceDataset.from_records(held_records, tokenizer, **limits)
    return train, held_out


def _check_reference_tokenizer(config: PreferenceConfig, tokenizer: Tokenizer) -> None:
    other = Tokenizer.from_dir(config.reference_model)
    if other.get_vocab() != tokenizer.get_vocab():
        raise PreferenceError(
            f"the reference model {config.reference_model} has another tokenizer than {config.model_dir}; the "
            "log-probability ratios compare the same token ids, so both need one vocabulary"
        )


def _reference_scores(
    config: PreferenceConfig, model: nn.Module, parts: dict[str, PreferenceRows], out_dir: Path, resume: bool
) -> float:
    """Set the reference log-probabilities on each part's rows: read from the run's cache file
    when it holds them for the same pairs, else computed (and, on rank 0, written). Returns
    the seconds spent computing (0 when read)."""
    path = out_dir / REFERENCE_FILE
    fingerprints = {name: pairs_fingerprint(rows.pairs) for name, rows in parts.items()}
    source = str(config.reference_model or "policy at start")
    if resume and path.is_file():
        with safe_open(str(path), "pt") as cached:
            metadata = cached.metadata() or {}
            if all(metadata.get(name) == fingerprint for name, fingerprint in fingerprints.items()) and (
                metadata.get("reference") == source
            ):
                for name, rows in parts.items():
                    rows.set_reference(cached.get_tensor(name))
                return 0.0
        raise PreferenceError(
            f"cannot resume: {path} holds reference log-probabilities of other pairs or another reference model; "
            "resume with the data and reference the run started with"
        )
    started = time.perf_counter()
    if config.reference_model is not None:
        reference = load_model(config.reference_model, dtype=torch.float32).to(model.lm_head.weight.device)
        scores = {name: reference_logprobs(reference, rows, config.batch_size) for name, rows in parts.items()}
        del reference
    else:
        scores = {name: reference_logprobs(model, rows, config.batch_size) for name, rows in parts.items()}
    for name, rows in parts.items():
        rows.set_reference(scores[name])
    return time.perf_counter() - started


def _write_reference(path: Path, parts: dict[str, PreferenceRows], source: str) -> None:
    metadata = {name: pairs_fingerprint(rows.pairs) for name, rows in parts.items()} | {"reference": source}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        save_file({name: rows.reference_logps.contiguous() for name, rows in parts.items()}, str(temporary), metadata)


def train_preferences(
    config: PreferenceConfig, resume: bool = False, distributed: DistributedContext | None = None
) -> PreferenceResult:
    """Run `config` (see the module doc); resume=True continues the run in `out_dir`. Writes
    `out_dir/adapter/` (or `model/` for full fine-tuning), the trainer's files (checkpoints,
    metrics.jsonl, loss_curve.png), `reference_logps.safetensors` and `preference.json`, the
    result. Under torchrun rank 0 writes the files."""
    from ..finetune.lora import trainable_parameter_count
    from ..finetune.run import METHODS, _peak_rss_mib

    check_config(config)
    started = time.perf_counter()
    method = METHODS[config.method]
    out_dir = Path(config.out_dir)
    tokenizer = Tokenizer.from_dir(config.model_dir)
    if config.reference_model is not None:
        _check_reference_tokenizer(config, tokenizer)
    max_length = config.max_length or min(1024, read_config(config.model_dir).max_position_embeddings)
    train, held_out = _pairs(config, tokenizer, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    truncated = train.truncated_pairs + held_out.truncated_pairs
    if truncated:
        warnings.warn(
            f"{config.data}: cut the prompts of {truncated} of {len(train) + len(held_out)} pairs from the left "
            f"({train.truncated_tokens + held_out.truncated_tokens} tokens) to fit max_length={max_length}, "
            f"max_prompt_length={config.max_prompt_length}",
            stacklevel=2,
        )
    rows = PreferenceRows(train.pairs, pad_id)
    val_rows = PreferenceRows(held_out.pairs, pad_id) if held_out.pairs else None

    model = load_model(config.model_dir, dtype=torch.float32)
    torch.manual_seed(config.seed)  # the adapter's initial weights: the same in every run and on every rank
    model = method.install(model, finetune_settings(config), tokenizer)
    if config.method == "full":
        model.requires_grad_(True)
    trainable, total = trainable_parameter_count(model)
    train_config = train_settings(config, out_dir, PREFERENCE_LR[config.method])
    objective = PreferenceObjective(config.loss, config.resolved_beta, config.resolved_label_smoothing, config.gamma)
    trainer = Trainer(
        model,
        rows,
        train_config,
        val_data=val_rows,
        tokenizer=tokenizer,
        distributed=distributed,
        objective=objective,
    )
    reference_seconds = 0.0
    if config.spec.reference:
        parts = {"train": rows} | ({"held_out": val_rows} if val_rows is not None else {})
        reference_seconds = _reference_scores(config, trainer.model, parts, out_dir, resume)
        if trainer.distributed.is_main and not (resume and (out_dir / REFERENCE_FILE).is_file()):
            _write_reference(out_dir / REFERENCE_FILE, parts, str(config.reference_model or "policy at start"))
    summary_path = out_dir / "preference.json"
    before = None
    if val_rows is not None:
        if resume and summary_path.exists():
            before = json.loads(summary_path.read_text()).get("before")
        else:
            before = trainer.evaluate()
    if trainer.distributed.is_main and not resume:
        out_dir.mkdir(parents=True, exist_ok=True)
        # written before training, so that a resumed run keeps the held-out scores of the start
        atomic_write_text(summary_path, json.dumps({"before": before}, indent=2))
    result = trainer.train(resume=resume)
    after = result.evals[-1] if result.evals else None
    output_dir = out_dir / method.output
    if trainer.distributed.is_main:
        output_dir = method.save(model, output_dir, tokenizer, str(config.model_dir))
    records = [r for r in trainer.read_metrics() if "tokens_per_s" in r]
    outcome = PreferenceResult(
        loss=config.loss,
        method=config.method,
        output_dir=output_dir,
        trainable_parameters=trainable,
        total_parameters=total,
        train_pairs=len(rows),
        held_out_pairs=len(val_rows) if val_rows is not None else 0,
        truncated_pairs=truncated,
        truncated_prompt_tokens=train.truncated_tokens + held_out.truncated_tokens,
        before=before,
        after=after,
        steps=result.step,
        tokens_per_s=sum(r["tokens_per_s"] for r in records) / len(records) if records else 0.0,
        peak_rss_mib=_peak_rss_mib(),
        reference_seconds=reference_seconds,
        seconds=time.perf_counter() - started,
        settings={
            "beta": config.resolved_beta,
            "label_smoothing": config.resolved_label_smoothing,
            "gamma": config.gamma,
            "lr": train_config.lr,
            "max_length": max_length,
            "max_prompt_length": config.max_prompt_length,
        },
    )
    if trainer.distributed.is_main:
        atomic_write_text(summary_path, json.dumps(outcome.to_json(), indent=2))
    return outcome


# ---------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `genforge align LOSS` for one loss of `PREFERENCE_LOSSES`, which the command
    registry sets as the parser's default `loss` first (`align.cli.ALIGN_COMMANDS`)."""
    from .flags import add_length_arguments, add_run_arguments, add_shared_training_arguments

    loss = parser.get_default("loss")
    spec = PREFERENCE_LOSSES[loss]
    reference = (
        "The reference model's log-probabilities are computed once before training (with LoRA: the base, "
        "adapters off). "
        if spec.reference
        else "No reference model is used. "
    )
    parser.description = (
        f"Align a model to JSONL preference pairs with {loss}: {spec.summary}. Pairs are {{'prompt', 'chosen', "
        "'rejected'} in plain text, or chat messages rendered with the model's chat template. "
        f"{reference}Writes OUT/adapter (a PEFT adapter that `genforge generate --adapter` loads) or OUT/model "
        "(--method full), metrics.jsonl with rewards, margins and accuracies per step, and preference.json with "
        "the held-out scores before and after. Interrupted runs continue with --resume; under torchrun every rank "
        "trains its slice of each batch."
    )
    parser.epilog = f"example: genforge align {loss} --model sft-model/ --data pairs.jsonl --out runs/{loss}"
    add_run_arguments(parser, "JSONL preference pairs", PREFERENCE_METHODS)
    knobs = parser.add_argument_group("the loss")
    beta_help = {
        "orpo": "the weight of the odds-ratio term (default 0.1)",
        "simpo": "the reward scale (default 2.0)",
    }.get(loss, "strength of the pull to the reference (the inverse temperature; default 0.1)")
    knobs.add_argument("--beta", type=float, help=beta_help)
    # Flags a loss does not take stay parseable but hidden, so the library's refusal (which
    # names the loss that takes them) is what the user reads.
    smoothing_help = {
        "cdpo": "the assumed share of flipped labels, in (0, 0.5) (default 0.1)",
        "robust": "the label-noise rate, in (0, 0.5) (default 0.1)",
        "simpo": "optional label smoothing, in [0, 0.5)",
    }
    knobs.add_argument("--label-smoothing", type=float, help=smoothing_help.get(loss, argparse.SUPPRESS))
    if loss == "simpo":
        knobs.add_argument("--gamma", type=float, default=0.5, help="the target reward margin (default 0.5)")
    knobs.add_argument(
        "--reference-model",
        help="a model directory (same tokenizer) to take as the reference" if spec.reference else argparse.SUPPRESS,
    )
    add_length_arguments(parser)
    add_shared_training_arguments(parser, "pairs", "peak learning rate (default: 5e-5 for adapters, 1e-6 for full)")


def run(args: argparse.Namespace) -> int:
    """`genforge align LOSS`: train, report one line on stderr and the result as JSON on stdout."""
    from ..console import console
    from .flags import launch, training_fields

    config = PreferenceConfig(
        **training_fields(args),
        loss=args.loss,
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        gamma=getattr(args, "gamma", 0.5),
        reference_model=args.reference_model,
    )
    result, context = launch(train_preferences, config, check_config, args.resume)
    if context.is_main:

        def scores(evaluation) -> str:
            if not evaluation:
                return "n/a"
            return (
                f"accuracy {evaluation['val_rewards/accuracies']:.1%}, margin {evaluation['val_rewards/margins']:+.3f}"
            )

        cut = f"; {result.truncated_pairs} prompts cut to fit" if result.truncated_pairs else ""
        console.print(
            f"{result.loss} ({result.method}): trained {result.trainable_parameters:,} of {result.total_parameters:,} "
            f"parameters for {result.steps} steps on {result.train_pairs:,} pairs{cut}; held-out "
            f"({result.held_out_pairs} pairs) {scores(result.before)} -> {scores(result.after)}; "
            f"{result.tokens_per_s:,.0f} tok/s, peak RSS {result.peak_rss_mib:,.0f} MiB; wrote {result.output_dir}"
        )
        print(json.dumps(result.to_json()))
    return 0


__all__ = [
    "PREFERENCE_LOSSES",
    "PREFERENCE_METHODS",
    "PreferenceConfig",
    "PreferenceDataError",
    "PreferenceError",
    "PreferenceLossSpec",
    "PreferenceObjective",
    "PreferenceResult",
    "add_arguments",
    "check_config",
    "flatten_pairs",
    "pair_logprobs",
    "reference_logprobs",
    "run",
    "train_preferences",
]
