"""A fine-tuning run: a Hugging Face model directory, instruction data and a method in; a
trained adapter (or model) with its held-out loss before and after out.

The run is the pretraining loop (`genforge.train.Trainer`: accumulation, clipping, AdamW with
warmup and cosine decay, checkpoints with exact resume, torchrun) over `SFTRows`, with the
method installed on the loaded model first. A method that freezes the base checkpoints only
its trainable tensors. Several data files train as one mixture (`mix_examples`).

Methods: `full` (every weight), `lora`, `dora` (Liu et al. 2024), `qlora` (Dettmers et al.
2023: LoRA over an NF4 base), `ia3` (Liu et al. 2022). Each saves what its users load: a
Hugging Face model directory for `full`, a PEFT adapter directory for the others.
"""

from __future__ import annotations

import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write_text
from ..checkpoint import load_model, save_model
from ..swap import linear_names
from ..tokenizer import Tokenizer
from ..train.distributed import DistributedContext
from ..train.trainer import TrainConfig, Trainer
from .continual import (
    EWC_STRENGTH,
    EWCPenalty,
    as_paths,
    check_continual,
    diagonal_fisher,
    example_batches,
    fisher_sample,
    save_ewc,
    trainable_snapshot,
    with_replay,
)
from .ia3 import IA3Config, apply_ia3, save_ia3_adapter
from .lora import LoraConfig, apply_lora, save_adapter, trainable_parameter_count
from .sft import SFTDataset, SFTExample, SFTRows


class FinetuneError(ValueError):
    """A fine-tuning run that cannot start as asked."""


@dataclass
class FinetuneConfig:
    """What a fine-tuning run reads, trains and writes.

    data: one JSONL file, or several trained as a mixture: sampled in proportion to
        `data_weights`, or to size ** (1 / mixture_temperature) (temperature sampling, as T5 and
        mT5 mix tasks and languages); neither means in proportion to size.
    eval_fraction: the share of each file held out (never trained on) to score the run.
    target_modules: which linear layers the adapter methods wrap (genforge names such as
        "qkv", "o", "gate_up", "down", or Hugging Face names such as "q_proj"); None: every
        linear layer in the blocks.
    lr: None picks the method's usual rate (2e-5 for full fine-tuning, 2e-4 for LoRA's family,
        3e-3 for IA3).
    Continual learning (`finetune.continual`): `replay_data`, an earlier task's file(s) whose
        training split is replayed as `replay_share` of the training examples (their held-out
        split, the same as the earlier run's with the same seed and eval_fraction, is never
        trained on); `ewc_fisher`, an EWC file written by an earlier run with `save_fisher`, or
        `ewc_data`, the earlier task's file(s) to compute the Fisher from on the loaded model,
        applied with `ewc_strength`; `save_fisher` writes `out_dir/fisher.safetensors` at the
        end, the Fisher over at most `fisher_examples` of this run's training examples.
    """

    model_dir: str | Path
    data: str | Path | Sequence[str | Path]
    out_dir: str | Path
    method: str = "lora"
    data_weights: Sequence[float] | None = None
    mixture_temperature: float | None = None
    seq_len: int = 512
    packing: bool = True
    overflow: str = "error"
    chat_template: str | None = None
    eval_fraction: float = 0.05
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
    method_options: dict = field(default_factory=dict)
    replay_data: str | Path | Sequence[str | Path] | None = None
    replay_share: float = 0.25
    ewc_fisher: str | Path | None = None
    ewc_data: str | Path | Sequence[str | Path] | None = None
    ewc_strength: float = EWC_STRENGTH
    save_fisher: bool = False
    fisher_examples: int = 256

    def files(self) -> list[Path]:
        data = [self.data] if isinstance(self.data, (str, Path)) else list(self.data)
        return [Path(path) for path in data]


# ----------------------------------------------------------------------------------- methods
def _block_linear_names(model: nn.Module) -> list[str]:
    """The last parts of the names of every linear layer inside the blocks (PEFT's "all-linear")."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_names(model) if name.startswith("blocks.")})


def _lora_config(model: nn.Module, config: FinetuneConfig, dora: bool = False) -> LoraConfig:
    return LoraConfig(
        target_modules=list(config.target_modules or _block_linear_names(model)),
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        use_dora=dora,
    )


def _full(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    return model


def _lora(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    return apply_lora(model, _lora_config(model, config))


def _dora(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    return apply_lora(model, _lora_config(model, config, dora=True))


def _qlora(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    from ..quantize.nf4 import quantize_linears_nf4

    lora_config = _lora_config(model, config)  # named while the layers are still nn.Linear
    quantize_linears_nf4(model)
    return apply_lora(model, lora_config)


def _ia3(model: nn.Module, config: FinetuneConfig) -> nn.Module:
    targets = list(config.target_modules or [n for n in ("qkv", "down") if n in _block_linear_names(model)])
    feedforward = [name for name in targets if name in ("down", "down_proj", "fc2", "c_proj")]
    return apply_ia3(model, IA3Config(target_modules=targets, feedforward_modules=feedforward or None))


def _save_full(model: nn.Module, directory: Path, tokenizer: Tokenizer, base: str) -> Path:
    return save_model(model, directory, tokenizer)


def _save_lora(model: nn.Module, directory: Path, tokenizer: Tokenizer, base: str) -> Path:
    return save_adapter(model, directory, base_model_name_or_path=base)


def _save_ia3(model: nn.Module, directory: Path, tokenizer: Tokenizer, base: str) -> Path:
    return save_ia3_adapter(model, directory, base_model_name_or_path=base)


@dataclass(frozen=True)
class Method:
    """How a method changes the loaded model, what it saves, and its usual learning rate."""

    install: Callable[[nn.Module, FinetuneConfig], nn.Module]
    save: Callable[[nn.Module, Path, Tokenizer, str], Path]
    lr: float
    output: str  # the directory name under out_dir: "model" or "adapter"


METHODS: dict[str, Method] = {
    "full": Method(_full, _save_full, 2e-5, "model"),
    "lora": Method(_lora, _save_lora, 2e-4, "adapter"),
    "dora": Method(_dora, _save_lora, 2e-4, "adapter"),
    "qlora": Method(_qlora, _save_lora, 2e-4, "adapter"),
    "ia3": Method(_ia3, _save_ia3, 3e-3, "adapter"),
}


# -------------------------------------------------------------------------------------- data
def mix_examples(
    datasets: Sequence[Sequence[SFTExample]],
    weights: Sequence[float] | None = None,
    temperature: float | None = None,
    seed: int = 0,
) -> list[SFTExample]:
    """One epoch of a multi-task mixture: as many examples as the datasets hold together, each
    dataset's share given by `weights`, or by size ** (1 / temperature) (Raffel et al. 2020's
    temperature-scaled mixing: T = 1 is proportional to size, large T tends to uniform), or by
    size alone. A dataset drawn more often than it has examples repeats them (each example once
    before any twice); the draw is seeded."""
    sizes = [len(dataset) for dataset in datasets]
    if not sizes or min(sizes) == 0:
        raise FinetuneError("every dataset of a mixture needs at least one example")
    if weights is not None and temperature is not None:
        raise FinetuneError("give mixture weights or a mixing temperature, not both")
    if weights is not None:
        if len(weights) != len(sizes) or any(not math.isfinite(w) or w <= 0 for w in weights):
            raise FinetuneError(
                f"mixture weights must be {len(sizes)} positive numbers, one per data file; got {list(weights)}"
            )
        shares = list(weights)
    elif temperature is not None:
        if not math.isfinite(temperature) or temperature <= 0:
            raise FinetuneError(f"the mixing temperature must be > 0, got {temperature}")
        shares = [size ** (1.0 / temperature) for size in sizes]
    else:
        shares = [float(size) for size in sizes]
    total = sum(sizes)
    counts = _largest_remainder([total * share / sum(shares) for share in shares])
    rng = random.Random(seed)
    mixed = []
    for dataset, count in zip(datasets, counts):
        order: list[int] = []
        while len(order) < count:
            epoch = list(range(len(dataset)))
            rng.shuffle(epoch)
            order.extend(epoch)
        mixed.extend(dataset[i] for i in order[:count])
    rng.shuffle(mixed)
    return mixed


def _largest_remainder(quotas: list[float]) -> list[int]:
    counts = [int(q) for q in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda i: quotas[i] - counts[i], reverse=True)
    for i in by_remainder[: round(sum(quotas)) - sum(counts)]:
        counts[i] += 1
    return counts


def split_held_out(examples: Sequence[SFTExample], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a seeded shuffle's first ceil(fraction * n) examples are held out,
    at least one when fraction > 0 and at least one is left to train on."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = min(len(order) - 1, math.ceil(fraction * len(order))) if fraction > 0 else 0
    held_out = [examples[i] for i in sorted(order[:held])]
    return [examples[i] for i in sorted(order[held:])], held_out


# ---------------------------------------------------------------------------------------- run
@dataclass
class FinetuneResult:
    method: str
    output_dir: Path
    trainable_parameters: int
    total_parameters: int
    train_examples: int
    held_out_examples: int
    val_loss_before: float | None
    val_loss_after: float | None
    steps: int
    tokens_per_s: float
    peak_rss_mib: float
    seconds: float

    @property
    def trainable_share(self) -> float:
        return self.trainable_parameters / self.total_parameters

    def to_json(self) -> dict:
        record = asdict(self)
        record["output_dir"] = str(self.output_dir)
        record["trainable_share"] = self.trainable_share
        return record


def check_config(config: FinetuneConfig) -> None:
    """Everything that can be checked before the model is read."""
    if config.method not in METHODS:
        raise FinetuneError(f"unknown method {config.method!r}; accepted: {', '.join(METHODS)}")
    if not (Path(config.model_dir) / "config.json").is_file():
        raise FinetuneError(f"{config.model_dir} is not a Hugging Face model directory (no config.json)")
    for path in config.files():
        if not path.is_file():
            raise FinetuneError(f"data file {path} does not exist")
    if not 0 <= config.eval_fraction < 1:
        raise FinetuneError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}")
    if config.data_weights is not None and len(config.data_weights) != len(config.files()):
        raise FinetuneError(
            f"{len(config.data_weights)} mixture weights for {len(config.files())} data files; give one per file"
        )
    check_continual(config)


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def finetune(
    config: FinetuneConfig, resume: bool = False, distributed: DistributedContext | None = None
) -> FinetuneResult:
    """Run `config` (see the module doc); resume=True continues the run in `out_dir`.
    Writes `out_dir/adapter/` (or `model/` for full fine-tuning), the trainer's files
    (checkpoints, metrics.jsonl, loss_curve.png) and `finetune.json`, the result. Under
    torchrun (`distributed`, see `genforge.train.distributed`) rank 0 writes the files."""
    check_config(config)
    started = time.perf_counter()
    method = METHODS[config.method]
    out_dir = Path(config.out_dir)
    tokenizer = Tokenizer.from_dir(config.model_dir)

    def read(path: Path) -> tuple[list[SFTExample], list[SFTExample]]:
        examples = SFTDataset.from_jsonl(
            path, tokenizer, max_length=config.seq_len, overflow=config.overflow, chat_template=config.chat_template
        ).examples
        return split_held_out(examples, config.eval_fraction, config.seed)

    train_sets, held_out = [], []
    for path in config.files():
        train, held = read(path)
        train_sets.append(train)
        held_out.extend(held)
    train = (
        train_sets[0]
        if len(train_sets) == 1
        else mix_examples(train_sets, config.data_weights, config.mixture_temperature, config.seed)
    )
    if config.replay_data is not None:
        earlier = [example for path in as_paths(config.replay_data) for example in read(path)[0]]
        train = with_replay(train, earlier, config.replay_share, config.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows = SFTRows(train, config.seq_len, pad_id, packing=config.packing)
    val_rows = SFTRows(held_out, config.seq_len, pad_id, packing=config.packing) if held_out else None

    model = load_model(config.model_dir, dtype=torch.float32)
    model = method.install(model, config)
    if config.method == "full":
        model.requires_grad_(True)
    trainable, total = trainable_parameter_count(model)
    ewc = None
    if config.ewc_fisher is not None:
        ewc = EWCPenalty.from_file(config.ewc_fisher, config.ewc_strength)
    elif config.ewc_data is not None:  # the Fisher of the earlier task at the loaded weights
        earlier = fisher_sample(
            [e for path in as_paths(config.ewc_data) for e in read(path)[0]], config.fisher_examples, config.seed
        )
        ewc = EWCPenalty(
            diagonal_fisher(model.to(config.device), example_batches(earlier)),
            trainable_snapshot(model),
            config.ewc_strength,
        )
    if ewc is not None:
        ewc.check(model)
    train_config = TrainConfig(
        out_dir=out_dir,
        max_steps=config.max_steps,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        lr=config.lr if config.lr is not None else method.lr,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        grad_clip=config.grad_clip,
        eval_every=config.eval_every,
        eval_batches=max(1, math.ceil(len(val_rows) / config.batch_size)) if val_rows else 1,
        save_every=config.save_every,
        seed=config.seed,
        gradient_checkpointing=config.gradient_checkpointing,
        device=config.device,
        progress=config.progress,
        export=False,
    )
    trainer = Trainer(
        model, rows, train_config, val_data=val_rows, tokenizer=tokenizer, distributed=distributed, regularizer=ewc
    )
    summary_path = out_dir / "finetune.json"
    before = None
    if val_rows is not None:
        if resume and summary_path.exists():
            before = json.loads(summary_path.read_text()).get("val_loss_before")
        else:
            before = trainer.evaluate()["val_loss"]
    result = trainer.train(resume=resume)
    after = result.evals[-1]["val_loss"] if result.evals else None
    output_dir = out_dir / method.output
    if trainer.distributed.is_main:
        output_dir = method.save(model, output_dir, tokenizer, str(config.model_dir))
        if config.save_fisher:  # for a later run's EWC: this task's Fisher at the trained weights
            sample = fisher_sample(train, config.fisher_examples, config.seed)
            fisher = diagonal_fisher(model, example_batches(sample))
            save_ewc(
                out_dir / "fisher.safetensors",
                fisher,
                trainable_snapshot(model),
                estimator="empirical Fisher, per example",
                examples=len(sample),
            )
    records = [r for r in trainer.read_metrics() if "tokens_per_s" in r]
    speed = sum(r["tokens_per_s"] for r in records) / len(records) if records else 0.0
    outcome = FinetuneResult(
        method=config.method,
        output_dir=output_dir,
        trainable_parameters=trainable,
        total_parameters=total,
        train_examples=rows.num_examples,
        held_out_examples=len(held_out),
        val_loss_before=before,
        val_loss_after=after,
        steps=result.step,
        tokens_per_s=speed,
        peak_rss_mib=_peak_rss_mib(),
        seconds=time.perf_counter() - started,
    )
    if trainer.distributed.is_main:
        atomic_write_text(summary_path, json.dumps(outcome.to_json(), indent=2))
    return outcome


__all__ = [
    "METHODS",
    "FinetuneConfig",
    "FinetuneError",
    "FinetuneResult",
    "Method",
    "check_config",
    "finetune",
    "mix_examples",
    "split_held_out",
]
