"""Data-parallel training on CPU with the gloo backend, two processes spawned by the test:
the loss curve, validation losses and final weights equal one process on the same global
batch (within 1e-5); only rank 0 writes files; a run stopped at a checkpoint resumes under
DDP to the same curve; FSDP gives the same curve too."""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from factories import tiny_encoder, tiny_model
from safetensors.torch import load_file

from genforge.train import TokenDataset, TrainConfig, Trainer, TrainError
from genforge.train.distributed import DistributedContext, destroy_distributed, init_distributed, rank_slice

SEQ_LEN = 16
STEPS = 4


def build_trainer(out_dir, model=None, **overrides):
    """The same run for one process and for each rank (each rank builds the same model and data)."""
    generator = torch.Generator().manual_seed(0)
    train = TokenDataset(torch.randint(3, 64, (48 * SEQ_LEN,), generator=generator), SEQ_LEN)
    val = TokenDataset(torch.randint(3, 64, (6 * SEQ_LEN,), generator=generator), SEQ_LEN)
    settings = dict(
        out_dir=out_dir,
        max_steps=STEPS,
        batch_size=4,
        grad_accum=2,
        lr=3e-3,
        warmup_steps=1,
        seed=5,
        progress=False,
        eval_every=2,
        eval_batches=2,
        save_every=2,
        export=True,
    )
    settings.update(overrides)
    return Trainer(model if model is not None else tiny_model(), train, TrainConfig(**settings), val_data=val)


class StopHere(Exception):
    pass


def _rank_main(rank, world, port, out_dir, overrides, stop_at, resume):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    context, device = init_distributed("cpu")
    assert context.world_size == world and context.rank == rank and device == "cpu"
    try:
        trainer = build_trainer(out_dir, **overrides)

        def stop(step, path):
            if step == stop_at:
                raise StopHere

        try:
            trainer.train(resume=resume, on_checkpoint=stop)
        except StopHere:
            pass
    finally:
        destroy_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(out_dir, world=2, stop_at=None, resume=False, **overrides):
    mp.spawn(_rank_main, args=(world, _free_port(), str(out_dir), overrides, stop_at, resume), nprocs=world, join=True)


def records(out_dir):
    return [json.loads(line) for line in Path(out_dir, "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("single")
    trainer = build_trainer(out)
    trainer.train()
    return out, records(out)


def assert_same_run(out, reference_out, reference_records):
    ours = records(out)
    # Rank 0 alone writes: each step and each evaluation appears once.
    assert [(r["step"], "loss" in r) for r in ours] == [(r["step"], "loss" in r) for r in reference_records]
    for a, b in zip(ours, reference_records):
        key = "loss" if "loss" in a else "val_loss"
        assert abs(a[key] - b[key]) <= 1e-5, (a, b)
    mine = load_file(Path(out, "model", "model.safetensors"))
    theirs = load_file(Path(reference_out, "model", "model.safetensors"))
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path, single):
    run_ranks(tmp_path / "ddp")
    assert_same_run(tmp_path / "ddp", *single)
    assert (
        json.loads((tmp_path / "ddp" / "checkpoints" / "step-00000004" / "state.json").read_text())["world_size"] == 2
    )


@pytest.mark.slow
def test_ddp_resume_continues_the_same_curve(tmp_path, single):
    out = tmp_path / "resumed"
    run_ranks(out, stop_at=2)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["step"] == 2
    run_ranks(out, resume=True)
    assert_same_run(out, *single)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_process_and_resume(tmp_path, single):
    out = tmp_path / "fsdp"
    run_ranks(out, stop_at=2, fsdp=True)
    with pytest.raises(TrainError, match="written with FSDP"):  # a sharded run's state resumes only sharded
        build_trainer(out).train(resume=True)
    run_ranks(out, resume=True, fsdp=True)
    assert_same_run(out, *single)


@pytest.mark.slow
def test_fsdp_with_cpu_offload_matches_one_process(tmp_path, single):
    """Shards and AdamW state kept in host memory (CPUOffloadPolicy): the same curve and weights."""
    run_ranks(tmp_path / "offload", fsdp=True, fsdp_cpu_offload=True)
    assert_same_run(tmp_path / "offload", *single)


def _masked_rank_main(rank, world, port, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    init_distributed("cpu")
    try:
        build_trainer(out_dir, model=tiny_encoder(), mask_token_id=4, special_token_ids=(0, 1, 2, 3, 4)).train()
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_masked_lm_under_ddp_matches_one_process(tmp_path, one_thread):
    """Masks are drawn for the global batch before it is sliced, so ranks see the single run's masks."""
    reference = tmp_path / "single"
    build_trainer(reference, model=tiny_encoder(), mask_token_id=4, special_token_ids=(0, 1, 2, 3, 4)).train()
    mp.spawn(_masked_rank_main, args=(2, _free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    assert_same_run(tmp_path / "ddp", reference, records(reference))


def test_rank_slices_cover_the_global_batch_once():
    rows = [list(range(8))[rank_slice(8, DistributedContext(rank=r, world_size=4))] for r in range(4)]
    assert rows == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="split evenly"):
        rank_slice(6, DistributedContext(rank=0, world_size=4))


def test_distributed_settings_are_checked_before_work(tmp_path):
    with pytest.raises(TrainError, match="multiple of 3"):
        build_trainer(tmp_path, batch_size=4).__class__(
            tiny_model(),
            TokenDataset(torch.arange(64) % 60 + 3, SEQ_LEN),
            TrainConfig(out_dir=tmp_path, max_steps=1, batch_size=4),
            distributed=DistributedContext(world_size=3),
        )
    with pytest.raises(TrainError, match="torchrun"):
        build_trainer(tmp_path, fsdp=True)
    with pytest.raises(TrainError, match="fsdp_cpu_offload .* needs fsdp=True"):
        build_trainer(tmp_path, fsdp_cpu_offload=True)
    assert not (tmp_path / "checkpoints").exists()


def test_pretrain_cpu_offload_needs_fsdp(text_model_dir, tmp_path, capsys):
    from genforge.cli import main

    text = tmp_path / "text.txt"
    text.write_text("a few words " * 20)
    flags = ["pretrain", "--model", str(text_model_dir), "--text", str(text), "--out", str(tmp_path / "run")]
    assert main([*flags, "--steps", "1", "--warmup", "0", "--fsdp-cpu-offload"]) == 2
    assert "needs fsdp=True" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_torchrun_environment_is_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="launch with torchrun"):
        init_distributed("cpu")
    with pytest.raises(ValueError, match="accepted: cpu, cuda"):
        init_distributed("mps")


@pytest.mark.slow
def test_torchrun_launches_genforge_pretrain(text_model_dir, tmp_path):
    """The documented launch line, end to end: two gloo processes, one run directory."""
    import subprocess
    import sys

    text = tmp_path / "text.txt"
    text.write_text("a small corpus for two processes to share, sentence after sentence. " * 60)
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "genforge.cli",
        "pretrain",
        "--model",
        str(text_model_dir),
        "--text",
        str(text),
        "--out",
        str(out),
        "--steps",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--warmup",
        "0",
        "--eval-every",
        "0",
        "--save-every",
        "0",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r["step"] for r in records(out) if "loss" in r]
    assert steps == [1, 2]  # rank 0 alone wrote metrics
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()
    assert "trained to step 2" in done.stderr
