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

Timing: one process loads every side and trains them in turn on the same batch, step by step
(the order reversed every step, so none always runs first), `--warmup` steps then `--steps`
timed ones; each side keeps its median step time, and the ratio is the median of the per-step
ratios. On a machine shared with other jobs the load changes by the minute; sides timed seconds
apart see the same load, so their ratio holds where separate runs minutes apart would not.
Memory: each side then runs alone in its own process (so the peaks do not mix) for
`--memory-steps` steps: its peak RSS over the whole process and over training alone (the
high-water mark reset by /proc/self/clear_refs after loading, where Linux allows it). The loss at
every step comes from the timing run; the memory runs repeat their first steps, which must agree.

Kernel floor: one step's kernels alone (the base and LoRA matrix products, attention, the LM head)
on each library's kernels and layout, timed in the parent after each round, the best kept
(`kernel_floor`). It bounds what a step built on those kernels can reach: the ceiling is PEFT's
median step over genforge's floor.

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
from machine import describe, write_results

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


def build_side(side: str, work: Path, args):
    """(step function, trainable parameter count) for `side`, loaded from `work`."""
    if side == "peft":
        return peft_step(work, args)
    return genforge_step(work, args, side.endswith("qlora"))


def batch_of(rows: dict, number: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    batch = slice(number * args.batch, (number + 1) * args.batch)
    return rows["input_ids"][batch], rows["labels"][batch]


def timing_run(work: Path, args) -> dict:
    """Every side in this process, stepped in turn on the same batches (see the module doc)."""
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    rows = load_file(str(work / "rows.safetensors"))
    steps, trainable = {}, {}
    for side in args.sides:
        steps[side], trainable[side] = build_side(side, work, args)
    losses = {side: [] for side in args.sides}
    times = {side: [] for side in args.sides}
    for number in range(args.warmup + args.steps):
        order = args.sides if number % 2 == 0 else args.sides[::-1]
        for side in order:
            start = time.perf_counter()
            losses[side].append(steps[side](*batch_of(rows, number, args)))
            times[side].append(time.perf_counter() - start)
    return {"losses": losses, "step_s": {side: t[args.warmup :] for side, t in times.items()}, "trainable": trainable}


def memory_run(side: str, work: Path, args) -> dict:
    """`side` alone: load, then `--memory-steps` steps; its RSS peaks and losses."""
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    rows = load_file(str(work / "rows.safetensors"))
    step, _ = build_side(side, work, args)
    loaded = rss_mib()
    reset = reset_peak_rss()
    losses = [step(*batch_of(rows, number, args)) for number in range(args.memory_steps)]
    trained = rss_mib()
    return {
        "side": side,
        "losses": losses,
        "rss_loaded_mib": loaded["now"],
        "peak_rss_mib": max(loaded["peak"], trained["peak"]),
        "train_peak_rss_mib": trained["peak"] if reset else None,
    }


# ------------------------------------------------------------------------------ the floor
def kernel_floor(args, library: str, repeats: int = 2) -> float:
    """Seconds of one LoRA step's kernels alone, back to back on random tensors of the step's
    shapes: every frozen base product (forward and the input's gradient), the six LoRA products
    of each adapted module, attention (SDPA forward and backward) and the LM head (forward and
    the hidden states' gradient), with nothing else a step does (norms, activations, residual
    adds, the softmax, the optimizer, Python). `library` "onednn" is genforge's kernels and
    layout (fused qkv and gate_up, the head in slices as its fused loss takes it); "mkl" is
    torch's default matmul on PEFT's separate modules, the head over all rows at once. One
    layer is timed (best of `repeats`) and counted `--layers` times."""
    import torch.nn.functional as F

    from genforge import onednn
    from genforge.train.losses import FUSED_CHUNK_ELEMENTS

    rows, rank, hidden, vocab = args.batch * args.seq_len, 16, 576, 49152
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    if library == "onednn":
        layout = [(576, [576, 192, 192]), (576, [576]), (576, [1536, 1536]), (1536, [576])]
        product = onednn.matmul_nt
        slice_rows = max(1, FUSED_CHUNK_ELEMENTS // vocab)
    else:
        layout = [(576, [576]), (576, [192]), (576, [192]), (576, [576]), (576, [1536]), (576, [1536]), (1536, [576])]
        product = lambda a, b: a @ b.t()  # noqa: E731
        slice_rows = rows
    modules = []
    for inputs, parts in layout:
        outputs = sum(parts)
        adapters = [(randn(rank, inputs), randn(part, rank)) for part in parts]
        modules.append((randn(rows, inputs), randn(outputs, inputs), randn(rows, outputs), adapters))
    q = randn(args.batch, 9, args.seq_len, 64).requires_grad_()
    k, v = (randn(args.batch, 3, args.seq_len, 64).requires_grad_() for _ in range(2))
    grad_attention = randn(args.batch, 9, args.seq_len, 64)
    head, head_in, head_grad = randn(vocab, hidden), randn(slice_rows, hidden), randn(slice_rows, vocab)

    def layer() -> None:
        for x, weight, grad, adapters in modules:
            product(x, weight)
            product(grad, weight.t())
            column = 0
            for a, b in adapters:
                h = x @ a.t()
                part_grad = grad[:, column : column + b.shape[0]]
                h @ b.t()
                grad_h = part_grad @ b
                part_grad.t() @ h
                grad_h.t() @ x
                grad_h @ a
                column += b.shape[0]
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(grad_attention)

    def lm_head() -> None:
        for _ in range(-(-rows // slice_rows)):
            product(head_in, head)
            product(head_grad, head.t())

    def best(run) -> float:
        run()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    return args.layers * best(layer) + best(lm_head)


# ------------------------------------------------------------------------------ the run
def spawn(work: Path, args, side: str | None = None) -> dict:
    """Run the timing run (side None) or `side`'s memory run in a fresh process; its JSON."""
    command = [sys.executable, __file__, "--work", str(work), "--sides", *args.sides]
    command += ["--memory-of", side] if side else ["--timing"]
    for name in ("layers", "seq_len", "batch", "warmup", "steps", "memory_steps", "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    command += ["--lr", str(args.lr)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the {side or 'timing'} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(timing: dict, memory: dict[str, dict], args) -> dict:
    tokens = args.batch * args.seq_len
    sides = {}
    for side in args.sides:
        step_s = timing["step_s"][side]
        median, best = statistics.median(step_s), min(step_s)
        sides[side] = {
            "trainable_parameters": timing["trainable"][side],
            "step_s_median": median,
            "step_s_best": best,
            "step_s_all": step_s,
            "tokens_per_s": tokens / median,
            "tokens_per_s_best": tokens / best,
            **{key: value for key, value in memory[side].items() if key not in ("side", "losses")},
            "losses": timing["losses"][side],
            "memory_run_losses": memory[side]["losses"],
        }

    def paired(mine: str, theirs: str) -> float:
        """The median of per-step ratios of `theirs` step time over `mine` (tokens/s of mine over theirs)."""
        pairs = zip(timing["step_s"][theirs], timing["step_s"][mine], strict=True)
        return statistics.median(t / m for t, m in pairs)

    ours, theirs = sides["genforge"], sides["peft"]
    difference = [abs(a - b) for a, b in zip(ours["losses"], theirs["losses"], strict=True)]
    result = {
        "speedup": paired("genforge", "peft"),
        "speedup_of_medians": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "speedup_best": ours["tokens_per_s_best"] / theirs["tokens_per_s_best"],
        "peak_rss_ratio": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
        "loss_max_abs_difference": max(difference),
        "loss_max_rel_difference": max(d / abs(b) for d, b in zip(difference, theirs["losses"], strict=True)),
        "memory_runs_repeat_losses": all(
            row["memory_run_losses"] == row["losses"][: len(row["memory_run_losses"])] for row in sides.values()
        ),
        "sides": sides,
    }
    if ours["train_peak_rss_mib"] and theirs["train_peak_rss_mib"]:
        result["train_peak_rss_ratio"] = ours["train_peak_rss_mib"] / theirs["train_peak_rss_mib"]
    if "genforge-qlora" in sides:
        q = sides["genforge-qlora"]
        result["qlora_vs_lora"] = {
            "tokens_per_s": 1 / paired("genforge", "genforge-qlora"),
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
        f"Timing: every side in one process, stepped in turn on the same batch (order reversed each step), "
        f"{s['warmup']} warm-up steps then {s['steps']} timed; medians. Memory: each side alone in its own "
        f"process, {s['memory_steps']} steps.",
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
        f"**genforge / PEFT: {result['speedup']:.2f}x tokens/s** (median of the per-step ratios; "
        f"{result['speedup_of_medians']:.2f}x of the medians, {result['speedup_best']:.2f}x of the best steps); "
        f"peak RSS {result['peak_rss_ratio']:.2f}x"
        + (f", training peak RSS {result['train_peak_rss_ratio']:.2f}x" if "train_peak_rss_ratio" in result else "")
        + ".",
    ]
    if "kernel_floor_s" in result:
        floor = result["kernel_floor_s"]
        lines.append(
            f"Kernel floor (the step's matrix products, attention and LM head alone): "
            f"genforge's kernels {floor['genforge']:.3f} s, PEFT's {floor['peft']:.3f} s ({result['kernel_speedup']:.2f}x). "
            f"genforge's median step is {sides['genforge']['step_s_median'] / floor['genforge']:.2f}x its floor, "
            f"PEFT's {sides['peft']['step_s_median'] / floor['peft']:.2f}x its own; a genforge step at its floor "
            f"would be {result['ceiling_speedup']:.2f}x PEFT's median step (the ceiling)."
        )
    if "qlora_vs_lora" in result:
        q = result["qlora_vs_lora"]
        lines.append(
            f"QLoRA / LoRA (genforge): {q['tokens_per_s']:.2f}x tokens/s (median of the per-step ratios), "
            f"peak RSS {q['peak_rss']:.2f}x, "
            f"training peak RSS {q['train_peak_rss']:.2f}x."
        )
    lines += [
        "",
        f"Loss at each step (warm-up steps included); largest difference genforge vs PEFT "
        f"{result['loss_max_abs_difference']:.2e} ({result['loss_max_rel_difference']:.1e} relative); the memory "
        f"runs repeated their steps' losses exactly: {result['memory_runs_repeat_losses']}.",
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
        ("--steps", 8),
        ("--memory-steps", 2),
        ("--threads", min(2, torch.get_num_threads())),
    ):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="genforge and peft are needed")
    parser.add_argument("--work", help="the prepared inputs (internal, with --timing or --memory-of)")
    parser.add_argument("--timing", action="store_true", help="run the timing run here and print its JSON (internal)")
    parser.add_argument("--memory-of", choices=SIDES, help="run this side's memory run here (internal)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="where finetune.{json,md} go")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if not {"genforge", "peft"} <= set(args.sides):
        parser.error("--sides must include genforge and peft (the comparison)")
    if args.timing or args.memory_of:
        work = Path(args.work)
        print(json.dumps(timing_run(work, args) if args.timing else memory_run(args.memory_of, work, args)))
        return 0

    torch.set_num_threads(args.threads)  # the kernel floors run here
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        prepare(work, args)
        timing = spawn(work, args)
        floors = {library: kernel_floor(args, library) for library in ("onednn", "mkl")}
        memory = {side: spawn(work, args, side) for side in args.sides}
    result = summarize(timing, memory, args)
    floor = {"genforge": floors["onednn"], "peft": floors["mkl"]}
    result["kernel_floor_s"] = floor
    # What genforge could reach if its step took only its kernels, against PEFT's measured step.
    result["ceiling_speedup"] = result["sides"]["peft"]["step_s_median"] / floor["genforge"]
    result["kernel_speedup"] = floor["peft"] / floor["genforge"]
    settings = {k: v for k, v in vars(args).items() if k not in ("work", "timing", "memory_of", "out", "no_write")}
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    result = {"machine": machine(), "settings": settings, "load_average": " ".join(load), **result}
    text = markdown(result)
    print(text)
    if not args.no_write:
        write_results(args.out, "finetune", result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
