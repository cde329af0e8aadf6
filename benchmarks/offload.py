"""CPU offloading of FSDP's shards and optimizer state: peak memory and step time against no
offload, DDP alongside for scale.

Each mode runs as its own job of `--ranks` processes (so each process's peak memory is its own),
training a Llama-style decoder for `--steps` timed AdamW steps after a warm-up step, through
`genforge.train.distributed.wrap_model` and `optim.build_optimizer`, the pieces the Trainer uses:

- ddp:          every rank holds the whole model, its gradients and the whole AdamW state
- fsdp:         FSDP2 shards parameters, gradients and AdamW state over the ranks
- fsdp+offload: as fsdp, the shards and the AdamW state kept in host memory
                (`CPUOffloadPolicy`; ZeRO-Offload, Ren et al. 2021), the optimizer step on the CPU

Per rank it records the median step time, where the training state lives (parameters, gradients
and AdamW moments: bytes per device type, counted from the tensors after the last step), the
peak device memory (`torch.cuda.max_memory_allocated` on CUDA) and the peak resident set size
of the process above its size before the model was built.

On a CPU-only machine the "device" is the CPU: offloading moves nothing anywhere, so memory
there is the process's RSS for every mode, and the table shows what the offload path costs
in copies and bookkeeping, not what it saves. The code path is the CUDA one: run with
`--device cuda` on a machine with GPUs to see device memory fall.

    python benchmarks/offload.py                 # CPU, gloo, 2 ranks -> benchmarks/results/offload.{json,md}
    python benchmarks/offload.py --device cuda   # NCCL, one GPU per rank
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from machine import describe, write_results

from genforge.config import Config
from genforge.model import Transformer
from genforge.train.distributed import destroy_distributed, init_distributed, wrap_model
from genforge.train.losses import causal_lm_loss
from genforge.train.optim import build_optimizer

MODES = {"ddp": dict(fsdp=False), "fsdp": dict(fsdp=True), "fsdp+offload": dict(fsdp=True, cpu_offload=True)}
MB = 2**20


def model_config(args) -> Config:
    return Config(
        family="llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        intermediate_size=args.intermediate,
        max_position_embeddings=args.seq_len,
    )


def rss_mb() -> float:
    """The process's resident set size now (Linux /proc), in MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / MB


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def state_bytes_by_device(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, float]]:
    """MiB of parameters, gradients and optimizer state this rank holds, per device type (a
    sharded parameter counts its local shard only)."""
    from torch.distributed.tensor import DTensor

    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    out: dict[str, dict[str, float]] = {}

    def add(kind: str, tensor: torch.Tensor) -> None:
        tensor = local(tensor)
        where = out.setdefault(tensor.device.type, {"parameters": 0.0, "gradients": 0.0, "optimizer": 0.0})
        where[kind] += tensor.numel() * tensor.element_size() / MB

    for parameter in model.parameters():
        add("parameters", parameter)
        if parameter.grad is not None:
            add("gradients", parameter.grad)
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                add("optimizer", value)
    return {device: {k: round(v, 1) for k, v in kinds.items()} for device, kinds in out.items()}


def _rank_main(rank: int, world: int, port: int, mode: str, args, result_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(args.threads)
    context, device = init_distributed(args.device)
    try:
        rss_before = rss_mb()
        torch.manual_seed(0)
        model = Transformer(model_config(args)).to(device)
        engine = wrap_model(model, context, **MODES[mode])
        optimizer = build_optimizer(model, 3e-4, 0.1, (0.9, 0.95), 1e-8)
        generator = torch.Generator().manual_seed(rank)
        times, losses = [], []
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for step in range(args.steps + 1):
            ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=generator).to(device)
            started = time.perf_counter()
            loss = causal_lm_loss(engine(ids).logits, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # keep the gradients to count them
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            if step:  # the first step builds the optimizer state and warms the kernels
                times.append(time.perf_counter() - started)
            losses.append(loss.item())
        record = {
            "rank": rank,
            "median_step_s": statistics.median(times),
            "min_step_s": min(times),
            "state_mib": state_bytes_by_device(model, optimizer),
            "peak_rss_above_start_mib": round(peak_rss_mb() - rss_before, 1),
            "losses": [round(x, 5) for x in losses],
        }
        if torch.device(device).type == "cuda":
            record["peak_device_mib"] = round(torch.cuda.max_memory_allocated() / MB, 1)
        Path(result_dir, f"{mode}-{rank}.json").write_text(json.dumps(record))
    finally:
        destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_mode(mode: str, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_rank_main, args=(args.ranks, _free_port(), mode, args, directory), nprocs=args.ranks, join=True)
        return [json.loads(Path(directory, f"{mode}-{r}.json").read_text()) for r in range(args.ranks)]


def markdown(result: dict) -> str:
    args, device = result["settings"], result["settings"]["device"]
    cuda = torch.device(device).type == "cuda"
    lines = [
        "# CPU offloading of FSDP's shards and AdamW state",
        "",
        f"{result['parameters'] / 1e6:.1f}M-parameter Llama-style decoder (hidden {args['hidden']}, {args['layers']} "
        f"layers), batch {args['batch_size']} x {args['seq_len']} tokens per rank, {args['ranks']} ranks on "
        f"`{device}` ({args['threads']} torch thread each), AdamW, median of {args['steps']} steps after a warm-up "
        "step; numbers are rank 0's (the ranks agree within noise). The modes ran one after another on a machine "
        "shared with other jobs: compare the ratios, and expect them to move by tens of percent between runs.",
        "",
        "| mode | step time (s) | vs fsdp | training state on device (MiB) | in host memory (MiB) | "
        + ("peak device memory (MiB) | " if cuda else "")
        + "peak RSS above start (MiB) |",
        "|---|---:|---:|---:|---:|" + ("---:|" if cuda else "") + "---:|",
    ]
    base = result["modes"]["fsdp"][0]["median_step_s"]
    for mode, ranks in result["modes"].items():
        r = ranks[0]
        on_device = sum(r["state_mib"].get(torch.device(device).type, {}).values()) if cuda else None
        on_host = sum(r["state_mib"].get("cpu", {}).values())
        cells = [
            mode,
            f"{r['median_step_s']:.3f}",
            f"{r['median_step_s'] / base:.2f}x",
            f"{on_device:.0f}" if cuda else "(the CPU is the device)",
            f"{on_host:.0f}",
        ]
        if cuda:
            cells.append(f"{r['peak_device_mib']:.0f}")
        cells.append(f"{r['peak_rss_above_start_mib']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Training state = this rank's parameters, gradients and AdamW moments, counted from the tensors after the "
        "last step (a sharded parameter counts its local shard).",
    ]
    if not cuda:
        lines += [
            "",
            "On this CPU-only machine the device is the host: offloading moves nothing, so the memory columns compare "
            "process RSS, and what the table shows is the offload path's cost (extra copies of each unit's shards and "
            "of the gradients, and bookkeeping) on top of FSDP. The code path is the CUDA one; there, the parameter, "
            "gradient and AdamW bytes of the fsdp row move from device to host memory, and the step pays for the "
            "host-device copies and a CPU optimizer step. Run `python benchmarks/offload.py --device cuda` on a GPU "
            "machine for that table.",
        ]
    curves = {mode: ranks[0]["losses"] for mode, ranks in result["modes"].items()}
    same = len({tuple(c) for c in curves.values()}) == 1
    lines += [
        "",
        f"Loss curves (rank 0, same seed and data): {'equal in every mode' if same else 'DIFFER: ' + json.dumps(curves)}.",
        "",
        "Machine: " + ", ".join(f"{key} {value}" for key, value in result["machine"].items()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per rank per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--rewrite-table", action="store_true", help="rewrite offload.md from offload.json, no run")
    args = parser.parse_args(argv)
    if args.rewrite_table:
        result = json.loads(Path(args.out, "offload.json").read_text())
        write_results(args.out, "offload", result, markdown(result))
        return 0
    if "fsdp" not in args.modes:
        args.modes.insert(0, "fsdp")  # the baseline the table compares against
    result = {
        "settings": vars(args) | {"modes": args.modes},
        "parameters": model_config(args).num_parameters(),
        "machine": describe(),
        "modes": {},
    }
    for mode in args.modes:
        print(f"{mode} ...", file=sys.stderr, flush=True)
        result["modes"][mode] = run_mode(mode, args)
        print(json.dumps(result["modes"][mode][0]), file=sys.stderr)
    write_results(args.out, "offload", result, markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
