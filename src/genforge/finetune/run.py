"""A fine-tuning run: a Hugging Face model directory, instruction data and a method in; a
trained adapter (or model) with its held-out loss before and after out.

The run is the pretraining loop (`genforge.train.Trainer`: accumulation, clipping, AdamW with
warmup and cosine decay, checkpoints with exact resume, torchrun) over `SFTRows`, with the
method installed on the loaded model first. A method that freezes the base checkpoints only
its trainable tensors. Several data files train as one mixture (`mix_examples`).

Methods: `full` (every weight), `lora`, `dora` (Liu et al. 2024), `qlora` (Dettmers et al.
2023: LoRA over an NF4 base), `ia3` (Liu et al. 2022), `bitfit` (Ben Zaken et al. 2022: the
biases), `adapter` (bottleneck adapters, Houlsby et al. 2019 / Pfeiffer et al. 2020), and the
prompt methods `prompt` (Lester et al. 2021), `ptuning` (Liu et al. 2021) and `prefix` (Li &
Liang 2021). Each saves what its users load: a Hugging Face model directory for `full` and
`bitfit`, a PEFT adapter directory for the PEFT methods, genforge's adapter directory for
bottleneck adapters (PEFT has none).
"""

from __future__ import annotations

import json
import math
import random
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_write_text
from ..checkpoint import load_model, read_config, save_model
from ..quantize.saved import read_quantization_config
from ..swap import linear_names
from ..tokenizer import Tokenizer
from ..train.distributed import DistributedContext
from ..train.trainer import TrainConfig, Trainer
from .adapters import AdapterConfig, apply_adapters, apply_bitfit, merge_adapters, save_adapters
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
from .distill import DISTILL_MODES, teacher_answers
from .ia3 import IA3Config, apply_ia3, save_ia3_adapter
from .lora import LoraConfig, apply_lora, save_adapter, trainable_parameter_count
from .prompts import (
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    apply_prompt_learning,
    save_prompt_adapter,
)
from .sft import SFTDataset, SFTExample, SFTRows, read_sft_records
from .tasks import write_jsonl


class FinetuneError(ValueError):
    """A fine-tuning run that cannot start as asked."""


@dataclass
class FinetuneConfig:
    """What a fine-tuning run reads, trains and writes.

    data: one JSONL file, or several trained as a mixture: sampled in proportion to
        `data_weights`, or to size ** (1 / mixture_temperature) (temperature sampling, as T5 and
        mT5 mix tasks and languages); neither means in proportion to size.
    eval_fraction: the share of each file held out (never trained on) to score the run.
    eval_data: held-out JSONL file(s) to score the run with instead (then nothing is split off).
    seq_len: tokens per training row; None: the model's context (after a prompt method's
        virtual tokens), at most 1024.
    packing: several examples per row (see `SFTRows`); None: on, except for the prompt
        methods, whose virtual tokens belong before each example.
    target_modules: which linear layers LoRA's family and IA3 wrap, or whose biases BitFit
        trains (genforge names such as "qkv", "o", "gate_up", "down", or Hugging Face names
        such as "q_proj"); None: every linear layer in the blocks (BitFit: every bias).
    lr: None picks the method's usual rate (see `METHODS`).
    num_virtual_tokens, prompt_init ("RANDOM", "SAMPLE_VOCAB", "TEXT"), prompt_init_text,
        encoder_type ("MLP", "LSTM"), encoder_hidden_size, prefix_projection: the prompt
        methods' settings, with PEFT's meanings (see `finetune.prompts`).
    bottleneck_size or reduction_factor, adapter_activation, placement ("houlsby",
        "pfeiffer"), target_layers: bottleneck adapters' settings (see `finetune.adapters`).
    teacher: a model directory to distil from (see `finetune.distill`): distill="soft" trains
        towards its next-token distributions (distill_alpha, distill_temperature, distill_kind;
        the vocabularies must match), distill="sequence" trains on its greedy answers to the
        training prompts (up to teacher_max_new_tokens; any tokenizer).
    Continual learning (`finetune.continual`): `replay_data`, an earlier task's file(s) whose
        training split is replayed as `replay_share` of the training examples (their held-out
        split, the same as the earlier run's with the same seed and eval_fraction, is never
        trained on); `ewc_fisher`, an EWC file written by an earlier run with `save_fisher`, or
        `ewc_data`, the earlier task's file(s) to compute the Fisher from on the loaded model,
        applied with `ewc_strength`; `save_fisher` writes `out_dir/fisher.safetensors` at the
        end, the Fisher over at most `fisher_examples` of this run's training examples.
    dp_noise_multiplier: train with DP-SGD (`genforge.safety.privacy`): Poisson batches of
        expected size batch_size x grad_accum, each example's gradient clipped to
        `dp_max_grad_norm`, Gaussian noise of this multiplier; ε at `dp_delta` is reported.
        One example per row (packing off).
    """

    model_dir: str | Path
    data: str | Path | Sequence[str | Path]
    out_dir: str | Path
    method: str = "lora"
    data_weights: Sequence[float] | None = None
    mixture_temperature: float | None = None
    seq_len: int | None = None
    packing: bool | None = None
    overflow: str = "error"
    chat_template: str | None = None
    eval_fraction: float = 0.05
    eval_data: str | Path | Sequence[str | Path] | None = None
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
    num_virtual_tokens: int = 20
    prompt_init: str = "RANDOM"
    prompt_init_text: str | None = None
    encoder_type: str = "MLP"
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    bottleneck_size: int | None = None
    reduction_factor: float | None = None
    adapter_activation: str = "relu"
    placement: str = "houlsby"
    target_layers: Sequence[int] | None = None
    teacher: str | Path | None = None
    distill: str = "soft"
    distill_alpha: float = 0.5
    distill_temperature: float = 1.0
    distill_kind: str = "forward_kl"
    teacher_max_new_tokens: int = 256
    replay_data: str | Path | Sequence[str | Path] | None = None
    replay_share: float = 0.25
    ewc_fisher: str | Path | None = None
    ewc_data: str | Path | Sequence[str | Path] | None = None
    ewc_strength: float = EWC_STRENGTH
    save_fisher: bool = False
    fisher_examples: int = 256
    dp_noise_multiplier: float | None = None
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5

    def files(self) -> list[Path]:
        return as_paths(self.data)

    def eval_files(self) -> list[Path]:
        return as_paths(self.eval_data)


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


def _full(model: nn.Module, config: FinetuneConfig, tokenizer: Tokenizer) -> nn.Module:
    return model


def _lora(model: nn.Module, config: FinetuneConfig, tokenizer: Tokenizer) -> nn.Module:
    return apply_lora(model, _lora_config(model, config))


def _dora(model: nn.Module, config: FinetuneConfig, tokenizer: Tokenizer) -> nn.Module:
    return apply_lora(model, _lora_config(model, config, dora=True))


def _qlora(model: nn.Module, config: FinetuneConfig, tokenizer: Tokenizer) -> nn.Module:
    from ..quantize.nf4 import quantize_linears_nf4

    lora_config = _lora_config(model, config)  # named while the layers are still nn.Linear
    quantize_linears_nf4(model)
    return apply_lora(model, lora_config)


def _ia3(model: nn.Module, config: FinetuneConfig, tokenizer: Tokenizer) -> nn.Module:
    targets = list(config.target_modules or [n for n in ("qkv", "down") if n in _block_linear_names(model)])
    feedforward = [name for name in targets if name in ("down", "down_proj", "fc2", "c_proj")]
    return apply_ia3(model, IA3Config(target_modules=targets, feedforward_modules=feedforward or None))


def _bitfit(model: nn.Module, config: FinetuneConfig, tokenizer: Tokenizer) -> nn.Module:
    return apply_bitfit(model, list(config.target_modules) if config.target_modules else None)


def _adapter(model: nn.Module, config: FinetuneConfig, tokenizer: Tokenizer) -> nn.Module:
    settings = AdapterConfig(
        bottleneck_size=config.bottleneck_size,
        reduction_factor=config.reduction_factor,
        activation=config.adapter_activation,
        placement=config.placement,
        target_layers=list(config.target_layers) if config.target_layers is not None else None,
    )
    return apply_adapters(model, settings)


def _prompt_config(config: FinetuneConfig):
    """The prompt method's PEFT-style config from the run's settings."""
    if config.method == "prompt":
        return PromptTuningConfig(
            num_virtual_tokens=config.num_virtual_tokens,
            prompt_tuning_init=config.prompt_init,
            prompt_tuning_init_text=config.prompt_init_text,
            tokenizer_name_or_path=str(config.model_dir) if config.prompt_init == "TEXT" else None,
        )
    if config.method == "ptuning":
        return PTuningConfig(
            num_virtual_tokens=config.num_virtual_tokens,
            encoder_reparameterization_type=config.encoder_type,
            encoder_hidden_size=config.encoder_hidden_size,
        )
    return PrefixTuningConfig(
        num_virtual_tokens=config.num_virtual_tokens,
        prefix_projection=config.prefix_projection,
        encoder_hidden_size=config.encoder_hidden_size,
    )


def _prompt(model: nn.Module, config: FinetuneConfig, tokenizer: Tokenizer) -> nn.Module:
    return apply_prompt_learning(model, _prompt_config(config), tokenizer)


def _save_full(model: nn.Module, directory: Path, tokenizer: Tokenizer, base: str) -> Path:
    return save_model(model, directory, tokenizer)


def _save_lora(model: nn.Module, directory: Path, tokenizer: Tokenizer, base: str) -> Path:
    return save_adapter(model, directory, base_model_name_or_path=base)


def _save_ia3(model: nn.Module, directory: Path, tokenizer: Tokenizer, base: str) -> Path:
    return save_ia3_adapter(model, directory, base_model_name_or_path=base)


def _save_bitfit(model: nn.Module, directory: Path, tokenizer: Tokenizer, base: str) -> Path:
    return save_model(merge_adapters(model), directory, tokenizer)


def _save_adapter(model: nn.Module, directory: Path, tokenizer: Tokenizer, base: str) -> Path:
    return save_adapters(model, directory, base_model_name_or_path=base)


def _save_prompt(model: nn.Module, directory: Path, tokenizer: Tokenizer, base: str) -> Path:
    return save_prompt_adapter(model, directory, base_model_name_or_path=base)


@dataclass(frozen=True)
class Method:
    """How a method changes the loaded model, what it saves, and its usual learning rate."""

    install: Callable[[nn.Module, FinetuneConfig, Tokenizer], nn.Module]
    save: Callable[[nn.Module, Path, Tokenizer, str], Path]
    lr: float
    output: str  # the directory name under out_dir: "model" or "adapter"
    prompt: bool = False  # virtual tokens before each example: rows are not packed


METHODS: dict[str, Method] = {
    "full": Method(_full, _save_full, 2e-5, "model"),
    "lora": Method(_lora, _save_lora, 2e-4, "adapter"),
    "dora": Method(_dora, _save_lora, 2e-4, "adapter"),
    "qlora": Method(_qlora, _save_lora, 2e-4, "adapter"),
    "ia3": Method(_ia3, _save_ia3, 3e-3, "adapter"),
    "bitfit": Method(_bitfit, _save_bitfit, 1e-3, "model"),
    "adapter": Method(_adapter, _save_adapter, 1e-3, "adapter"),
    "prompt": Method(_prompt, _save_prompt, 3e-2, "adapter", prompt=True),
    "ptuning": Method(_prompt, _save_prompt, 3e-3, "adapter", prompt=True),
    "prefix": Method(_prompt, _save_prompt, 3e-3, "adapter", prompt=True),
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
    privacy: dict | None = None  # DP-SGD runs: epsilon at delta and its settings

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
    quantized = read_quantization_config(config.model_dir)
    if quantized is not None:
        # Training changes weights (or adds an adapter merged into them later): neither has
        # a meaning on integer codes. QLoRA quantizes the fp model itself, as it loads it.
        trains = "the model's weights" if METHODS[config.method].output == "model" else "an adapter on fp layers"
        raise FinetuneError(
            f"{config.model_dir} is a quantized model (genforge quantize --method {quantized.get('method')}); "
            f"--method {config.method} trains {trains}. Fine-tune the floating-point model and quantize after, or "
            "use --method qlora on the floating-point model"
        )
    for path in config.files() + config.eval_files():
        if not path.is_file():
            raise FinetuneError(f"data file {path} does not exist")
    if not 0 <= config.eval_fraction < 1:
        raise FinetuneError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}")
    if config.packing and METHODS[config.method].prompt:
        raise FinetuneError(
            f"--method {config.method} puts virtual tokens before each example, so rows cannot be packed; "
            "leave packing off (the default for prompt methods)"
        )
    if config.teacher is not None:
        if config.distill not in DISTILL_MODES:
            raise FinetuneError(f"distill {config.distill!r} is not supported; accepted: {', '.join(DISTILL_MODES)}")
        if not (Path(config.teacher) / "config.json").is_file():
            raise FinetuneError(f"teacher {config.teacher} is not a Hugging Face model directory (no config.json)")
    if config.data_weights is not None and len(config.data_weights) != len(config.files()):
        raise FinetuneError(
            f"{len(config.data_weights)} mixture weights for {len(config.files())} data files; give one per file"
        )
    check_continual(config)
    if config.dp_noise_multiplier is not None and config.packing:
        raise FinetuneError(
            "DP-SGD protects one example per row; packed rows mix several, so leave packing off with DP"
        )


def _teacher_records(config: FinetuneConfig, records: list, path: Path, resume: bool) -> list:
    """The training records with the teacher's answers (sequence-level distillation), made once
    per run: written to `path` and read back from it on resume."""
    if resume and path.is_file():
        return read_sft_records(path)
    from ..loading import load_for_inference

    loaded = load_for_inference(config.teacher)
    answered = teacher_answers(
        loaded.model,
        loaded.tokenizer,
        [record for _, record in records],
        max_new_tokens=config.teacher_max_new_tokens,
        eos_token_ids=loaded.eos_token_ids,
        sources=[where for where, _ in records],
    )
    write_jsonl(answered, path)
    return read_sft_records(path)


def _peak_rss_mib() -> float:
    """This process's peak resident memory. Linux's VmHWM, since getrusage in a child process
    starts from its parent's peak; getrusage elsewhere."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def _tokenized(records, tokenizer: Tokenizer, config: FinetuneConfig, seq_len: int) -> list[SFTExample]:
    return SFTDataset.from_records(
        records, tokenizer, max_length=seq_len, overflow=config.overflow, chat_template=config.chat_template
    ).examples


def _training_split(path: Path, tokenizer: Tokenizer, config: FinetuneConfig, seq_len: int) -> list[SFTExample]:
    """A data file's training examples: its held-out split (the same in every run with the same
    seed and fraction, so an earlier task's held-out examples are never trained on) left out."""
    records = split_held_out(read_sft_records(path), config.eval_fraction, config.seed)[0]
    return _tokenized(records, tokenizer, config, seq_len)


def _examples(
    config: FinetuneConfig, tokenizer: Tokenizer, seq_len: int, out_dir: Path, resume: bool
) -> tuple[list[SFTExample], list[SFTExample]]:
    """(training examples, held-out examples): each data file split (or `eval_data` held out),
    the training records answered by the teacher for sequence-level distillation, several files
    mixed, and an earlier task's examples replayed."""
    held_out = [
        e for path in config.eval_files() for e in _tokenized(read_sft_records(path), tokenizer, config, seq_len)
    ]
    train_sets = []
    for number, path in enumerate(config.files()):
        fraction = 0.0 if config.eval_data is not None else config.eval_fraction
        train, held = split_held_out(read_sft_records(path), fraction, config.seed)
        if config.teacher is not None and config.distill == "sequence":
            train = _teacher_records(config, train, out_dir / "teacher" / f"{number}-{path.stem}.jsonl", resume)
        train_sets.append(_tokenized(train, tokenizer, config, seq_len))
        held_out.extend(_tokenized(held, tokenizer, config, seq_len))
    train = (
        train_sets[0]
        if len(train_sets) == 1
        else mix_examples(train_sets, config.data_weights, config.mixture_temperature, config.seed)
    )
    if config.replay_data is not None:
        earlier = [
            e for path in as_paths(config.replay_data) for e in _training_split(path, tokenizer, config, seq_len)
        ]
        train = with_replay(train, earlier, config.replay_share, config.seed)
    return train, held_out


def _ewc_penalty(config: FinetuneConfig, model: nn.Module, tokenizer: Tokenizer, seq_len: int) -> EWCPenalty | None:
    """The EWC penalty of the run: read from `ewc_fisher`, or the Fisher of the earlier task's
    data (`ewc_data`) at the loaded weights; None without either."""
    if config.ewc_fisher is not None:
        ewc = EWCPenalty.from_file(config.ewc_fisher, config.ewc_strength)
    elif config.ewc_data is not None:
        earlier = [e for path in as_paths(config.ewc_data) for e in _training_split(path, tokenizer, config, seq_len)]
        sample = fisher_sample(earlier, config.fisher_examples, config.seed)
        fisher = diagonal_fisher(model.to(config.device), example_batches(sample))
        ewc = EWCPenalty(fisher, trainable_snapshot(model), config.ewc_strength)
    else:
        return None
    ewc.check(model)
    return ewc


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
    context = read_config(config.model_dir).max_position_embeddings - (
        config.num_virtual_tokens if method.prompt else 0
    )
    seq_len = config.seq_len if config.seq_len is not None else min(1024, context)
    private = config.dp_noise_multiplier is not None
    packing = config.packing if config.packing is not None else not (method.prompt or private)
    train, held_out = _examples(config, tokenizer, seq_len, out_dir, resume)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    rows = SFTRows(train, seq_len, pad_id, packing=packing)
    val_rows = SFTRows(held_out, seq_len, pad_id, packing=packing) if held_out else None

    model = load_model(config.model_dir, dtype=torch.float32)
    torch.manual_seed(config.seed)  # the method's initial weights: the same in every run and on every rank
    model = method.install(model, config, tokenizer)
    if config.method == "full":
        model.requires_grad_(True)
    trainable, total = trainable_parameter_count(model)
    teacher = None
    if config.teacher is not None and config.distill == "soft":
        teacher = load_model(config.teacher, dtype=torch.float32)
    ewc = _ewc_penalty(config, model, tokenizer, seq_len)
    privacy = None
    if private:
        from ..safety.privacy import DPSGD, DPConfig

        privacy = DPSGD(DPConfig(config.dp_noise_multiplier, config.dp_max_grad_norm, config.dp_delta))
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
        distill_alpha=config.distill_alpha,
        distill_temperature=config.distill_temperature,
        distill_kind=config.distill_kind,
    )
    trainer = Trainer(
        model,
        rows,
        train_config,
        val_data=val_rows,
        tokenizer=tokenizer,
        distributed=distributed,
        teacher=teacher,
        regularizer=ewc,
        privacy=privacy,
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
        privacy=result.privacy,
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
