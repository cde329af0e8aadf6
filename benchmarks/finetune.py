"""LoRA fine-tuning throughput and memory: genforge's Trainer against transformers + PEFT with a
plain PyTorch loop, on the same model, data, adapter and optimizer; and genforge's QLoRA beside
its LoRA.

The model is SmolLM-135M's shape (a Llama: hidden 576, 30 layers, 9 heads / 3 kv heads, MLP 1536,
vocabulary 49152, tied embeddings) with random weights in fp32, saved once as a Hugging Face
directory. The adapter is PEFT's LoRA (Hu et al. 2021) with r 16, alpha 32, dropout 0 on q, k, v,
o, gate, up and down, made once by `peft.get_peft_model` and saved: both sides load that adapter
directory, so they start from the same A and B. The data is rows of `--seq-len` byte ids of
Python standard-library source text (a learnable stream, so the loss curve moves), the first
quarter of each row masked out of the loss as a prompt would be; every side sees the same rows in
the same order.

One step on each side: forward, next-token cross-entropy over the unmasked targets, backward,
global-norm clipping at 1.0, AdamW (lr `--lr`, betas (0.9, 0.95), weight decay 0.1, constant
rate) over the adapter's tensors, zeroing the gradients. The PEFT side is what its docs show:
`PeftModel.from_pretrained(..., is_trainable=True)`, `model(input_ids, labels=...)`,
`loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW` with torch's defaults. genforge's side
is what `genforge finetune --method lora` runs: `load_adapter` onto the loaded model, then
`Trainer.train_step` (the fused LM head + loss, oneDNN products on CPU). QLoRA is genforge's
`quantize_linears_nf4` then the same adapter (Dettmers et al. 2023); its base weights differ
(4-bit), so its losses are shown, not compared.

Each run is its own process (so peak memory is that side's alone): load, `--warmup` steps, then
`--steps` timed steps. Runs alternate genforge / PEFT / PEFT / genforge ... (`--rounds` of each),
QLoRA after them, and the median step time over a side's runs is reported; on a machine shared
with other jobs, ratios of medians are the numbers to read. Peak RSS is the process's high-water
mark over the whole run and over training alone (the mark reset by /proc/self/clear_refs after
loading, where Linux allows it).

    python benchmarks/finetune.py     # writes benchmarks/results/finetune.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
from machine import describe

SIDES = ("genforge", "peft", "genforge-qlora")
BETAS, WEIGHT_DECAY, CLIP = (0.9, 0.95), 0.1, 1.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------ memory
def rss_mib() -> dict[str, float]:
    """The process's resident set now and its high-water mark (VmRSS, VmHWM), MiB."""
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return {"now": values.get("VmRSS", 0.0), "peak": values.get("VmHWM", 0.0)}


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# ------------------------------------------------------------------------------ inputs
def prepare(work: Path, args) -> None:
    """The model directory, the PEFT adapter directory and the token rows every run reads."""
    import peft
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=args.layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(work / "model")
    torch.manual_seed(1)  # PEFT draws A (Kaiming-uniform) here; B starts at zero
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft.get_peft_model(model, lora).save_pretrained(work / "adapter")
    rows = (args.warmup + args.steps) * args.batch
    ids = torch.tensor(list(stdlib_text(rows * args.seq_len)), dtype=torch.long).view(rows, args.seq_len)
    labels = ids.clone()
    labels[:, : args.seq_len // 4] = -100  # a prompt: not scored
    save_file({"input_ids": ids, "labels": labels}, str(work / "rows.safetensors"))


def stdlib_text(count: int) -> bytes:
    """The first `count` bytes of the standard library's .py files, in sorted order (ids 0..255)."""
    text = bytearray()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text += path.read_bytes()
        if len(text) >= count:
            break
    if len(text) < count:
        raise RuntimeError(f"the standard library holds {len(text)} bytes of source; {count} were wanted")
    return bytes(text[:count])


# ------------------------------------------------------------------------------ one side
def genforge_step(work: Path, args, qlora: bool):
    from genforge.checkpoint import load_model
    from genforge.finetune import load_adapter
    from genforge.quantize.nf4 import quantize_linears_nf4
    from genforge.train import TokenDataset, TrainConfig, Trainer

    model = load_model(work / "model", dtype=torch.float32)
    if qlora:
        quantize_linears_nf4(model)
    load_adapter(model, work / "adapter")
    stand_in = TokenDataset(torch.zeros(args.batch * args.seq_len, dtype=torch.long), args.seq_len)
    out = tempfile.mkdtemp(prefix="genforge-finetune-bench-")
    trainer = Trainer(
        model,
        stand_in,  # the steps below are given their rows; this only fixes seq_len for the checks
        TrainConfig(
            out_dir=out,
            max_steps=args.warmup + args.steps,
            batch_size=args.batch,
            lr=args.lr,
            min_lr_ratio=1.0,  # a constant rate, as the plain loop's
            betas=BETAS,
            weight_decay=WEIGHT_DECAY,
            grad_clip=CLIP,
            progress=False,
            export=False,
        ),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return (lambda ids, labels: trainer.train_step([{"input_ids": ids, "labels": labels}])["loss"]), trainable


def peft_step(work: Path, args):
    import peft
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    model.config.use_cache = False  # training: no KV cache
    model = peft.PeftModel.from_pretrained(model, work / "adapter", is_trainable=True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=BETAS, weight_decay=WEIGHT_DECAY)

    def step(ids: torch.Tensor, labels: torch.Tensor) -> float:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step, sum(p.numel() for p in trainable)


def run_side(side: str, work: Path, args) -> dict:
    """Load `side`, train `--warmup` then `--steps` steps; losses, step times and memory."""
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    rows = load_file(str(work / "rows.safetensors"))
    start = time.perf_counter()
    step, trainable = peft_step(work, args) if side == "peft" else genforge_step(work, args, side.endswith("qlora"))
    load_s = time.perf_counter() - start
    loaded = rss_mib()
    reset = reset_peak_rss()
    losses, times = [], []
    for number in range(args.warmup + args.steps):
        batch = slice(number * args.batch, (number + 1) * args.batch)
        start = time.perf_counter()
        losses.append(step(rows["input_ids"][batch], rows["labels"][batch]))
        times.append(time.perf_counter() - start)
    trained = rss_mib()
    return {
        "side": side,
        "trainable_parameters": trainable,
        "load_s": load_s,
        "losses": losses,
        "step_s": times[args.warmup :],
        "warmup_step_s": times[: args.warmup],
        "rss_loaded_mib": loaded["now"],
        "peak_rss_mib": max(loaded["peak"], trained["peak"]),
        "train_peak_rss_mib": trained["peak"] if reset else None,
    }


# ------------------------------------------------------------------------------ the run
def spawn(side: str, work: Path, args) -> dict:
    command = [sys.executable, __file__, "--side", side, "--work", str(work)]
    for name in ("layers", "seq_len", "batch", "warmup", "steps", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--lr", str(args.lr)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: list[dict], args) -> dict:
    tokens = args.batch * args.seq_len
    sides = {}
    for side in SIDES:
        mine = [r for r in runs if r["side"] == side]
        if not mine:
            continue
        medians = [statistics.median(r["step_s"]) for r in mine]
        step = statistics.median(medians)
        best = min(min(r["step_s"]) for r in mine)
        train_peaks = [r["train_peak_rss_mib"] for r in mine if r["train_peak_rss_mib"] is not None]
        sides[side] = {
            "trainable_parameters": mine[0]["trainable_parameters"],
            "step_s_median": step,
            "step_s_best": best,
            "step_s_run_medians": medians,
            "tokens_per_s": tokens / step,
            "tokens_per_s_best": tokens / best,
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in mine),
            "train_peak_rss_mib": statistics.median(train_peaks) if train_peaks else None,
            "rss_loaded_mib": statistics.median(r["rss_loaded_mib"] for r in mine),
            "load_s": statistics.median(r["load_s"] for r in mine),
            "losses": mine[0]["losses"],
            "losses_repeat_equal": all(r["losses"] == mine[0]["losses"] for r in mine),
        }
    ours, theirs = sides["genforge"], sides["peft"]
    difference = [abs(a - b) for a, b in zip(ours["losses"], theirs["losses"], strict=True)]
    result = {
        "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "speedup_best": ours["tokens_per_s_best"] / theirs["tokens_per_s_best"],
        "peak_rss_ratio": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
        "loss_max_abs_difference": max(difference),
        "loss_max_rel_difference": max(d / abs(b) for d, b in zip(difference, theirs["losses"], strict=True)),
        "sides": sides,
    }
    if ours["train_peak_rss_mib"] and theirs["train_peak_rss_mib"]:
        result["train_peak_rss_ratio"] = ours["train_peak_rss_mib"] / theirs["train_peak_rss_mib"]
    if "genforge-qlora" in sides:
        q = sides["genforge-qlora"]
        result["qlora_vs_lora"] = {
            "tokens_per_s": q["tokens_per_s"] / ours["tokens_per_s"],
            "peak_rss": q["peak_rss_mib"] / ours["peak_rss_mib"],
            "train_peak_rss": (q["train_peak_rss_mib"] or 0) / (ours["train_peak_rss_mib"] or 1),
        }
    return result


def machine() -> dict:
    import peft
    import transformers

    return describe(transformers=transformers.__version__, peft=peft.__version__) | {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def markdown(result: dict) -> str:
    s, m, sides = result["settings"], result["machine"], result["sides"]
    tokens = s["batch"] * s["seq_len"]
    lines = [
        "# LoRA fine-tuning: genforge vs transformers + PEFT (plain PyTorch loop)",
        "",
        f"Machine: {m['cpu']} ({m['cpu_capability']}), {s['threads']} threads; torch {m['torch']}, "
        f"transformers {m['transformers']}, peft {m['peft']}.",
        f"Model: SmolLM-135M's shape (Llama, hidden 576, {s['layers']} layers, 9 heads / 3 kv heads, MLP 1536, "
        "vocab 49152, tied embeddings), random weights, fp32.",
        f"LoRA r 16, alpha 32, dropout 0 on q, k, v, o, gate, up, down "
        f"({sides['genforge']['trainable_parameters']:,} trainable parameters), the same initial A and B on "
        f"both sides. Step: batch {s['batch']} x {s['seq_len']} tokens = {tokens} tokens (the first quarter of "
        f"each row masked from the loss); AdamW lr {s['lr']}, betas (0.9, 0.95), weight decay 0.1, clip 1.0.",
        f"Each run is its own process: {s['warmup']} warm-up steps, then {s['steps']} timed steps; "
        f"{s['rounds']} runs per side, alternated; medians over the runs.",
        "",
        "| | median step (s) | tokens/s | best step (s) | peak RSS (MiB) | training peak RSS (MiB) |"
        " RSS after loading (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"genforge": "genforge LoRA", "peft": "transformers + PEFT LoRA", "genforge-qlora": "genforge QLoRA"}
    for side, row in sides.items():
        train_peak = f"{row['train_peak_rss_mib']:,.0f}" if row["train_peak_rss_mib"] else "-"
        lines.append(
            f"| {names[side]} | {row['step_s_median']:.3f} | {row['tokens_per_s']:,.0f} | {row['step_s_best']:.3f} | "
            f"{row['peak_rss_mib']:,.0f} | {train_peak} | {row['rss_loaded_mib']:,.0f} |"
        )
    lines += [
        "",
        f"**genforge / PEFT: {result['speedup']:.2f}x tokens/s** (medians; {result['speedup_best']:.2f}x best steps); "
        f"peak RSS {result['peak_rss_ratio']:.2f}x"
        + (f", training peak RSS {result['train_peak_rss_ratio']:.2f}x" if "train_peak_rss_ratio" in result else "")
        + ".",
    ]
    if "qlora_vs_lora" in result:
        q = result["qlora_vs_lora"]
        lines.append(
            f"QLoRA / LoRA (genforge): {q['tokens_per_s']:.2f}x tokens/s, peak RSS {q['peak_rss']:.2f}x, "
            f"training peak RSS {q['train_peak_rss']:.2f}x."
        )
    lines += [
        "",
        f"Loss at each step (warm-up steps included); largest difference genforge vs PEFT "
        f"{result['loss_max_abs_difference']:.2e} ({result['loss_max_rel_difference']:.1e} relative):",
        "",
        "| step | " + " | ".join(names[side] for side in sides) + " |",
        "|---:|" + "---:|" * len(sides),
    ]
    for number in range(len(sides["genforge"]["losses"])):
        lines.append(f"| {number + 1} | " + " | ".join(f"{row['losses'][number]:.5f}" for row in sides.values()) + " |")
    lines += [
        "",
        f"Load average when the run ended: {result['load_average']}.",
        "",
        "Reproduce: `python benchmarks/finetune.py` (the machine was shared with other jobs; numbers are noisy).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in (
        ("--layers", 30),
        ("--seq-len", 256),
        ("--batch", 4),
        ("--warmup", 2),
        ("--steps", 6),
        ("--rounds", 2),
        ("--qlora-rounds", 1),
        ("--threads", min(2, torch.get_num_threads())),
    ):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--side", choices=SIDES, help="run one side in this process and print its JSON (internal)")
    parser.add_argument("--work", help="the prepared inputs (with --side)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="where finetune.{json,md} go")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(run_side(args.side, Path(args.work), args)))
        return 0
    from genforge.atomic import atomic_write_text

    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        prepare(work, args)
        runs = []
        for round_number in range(args.rounds):
            order = ("genforge", "peft") if round_number % 2 == 0 else ("peft", "genforge")
            for side in order:
                runs.append(spawn(side, work, args))
                print(f"{side}: median step {statistics.median(runs[-1]['step_s']):.3f} s", file=sys.stderr)
        for _ in range(args.qlora_rounds):
            runs.append(spawn("genforge-qlora", work, args))
    result = summarize(runs, args)
    settings = {k: v for k, v in vars(args).items() if k not in ("side", "work", "out", "no_write")}
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    result = {"machine": machine(), "settings": settings, "load_average": " ".join(load), **result, "runs": runs}
    text = markdown(result)
    print(text)
    if not args.no_write:
        directory = Path(args.out)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "finetune.json", json.dumps(result, indent=2))
        atomic_write_text(directory / "finetune.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
