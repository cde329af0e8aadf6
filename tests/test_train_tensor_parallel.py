"""Tensor parallelism on CPU with gloo, two processes spawned by the test: the sharded model's
logits, one training step's gradients (gathered), the clipped global norm and the weights after
an SGD step equal the single-process model within 1e-5, for GQA, biased/tied/learned positions,
q/k norm and mixture-of-experts layouts, and with sequence parallelism; `genforge generate --tensor-parallel` under
torchrun gives the tokens of one process. Bad degrees are refused before any work."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from factories import tiny_model

from genforge.config import Config
from genforge.train.distributed import destroy_distributed, init_distributed
from genforge.train.losses import causal_lm_loss
from genforge.train.optim import clip_gradients as clip_whole
from genforge.train.tensor_parallel import (
    TensorParallelError,
    accepted_degrees,
    check_tensor_parallel,
    clip_gradients,
    full_gradients,
    full_state_dict,
    fused_row_order,
    local_config,
    parallelize_transformer,
    tensor_parallel_mesh,
    unsharded_copy,
)

GPT2_LIKE = dict(
    family="gpt2",
    norm="layernorm",
    activation="gelu",
    gated_mlp=False,
    qkv_bias=True,
    attn_out_bias=True,
    mlp_bias=True,
    position="learned",
    tie_word_embeddings=True,
)
# name -> (config overrides, sequence parallel)
LAYOUTS = {
    "gqa": (dict(), False),  # 4 query heads over 2 key/value heads, SwiGLU, untied vocabulary-parallel head
    "gpt2": (GPT2_LIKE, False),  # biases in every linear, a tied head (kept whole), learned positions
    "qk_norm": (dict(qk_norm=True, num_kv_heads=4, qkv_bias=True), False),
    "moe": (dict(num_experts=4, num_experts_per_token=2), False),
    # The residual stream and the blocks' norms split by position (11 positions: unevenly).
    "gqa+sp": (dict(), True),
    "gemma+sp": (dict(family="gemma", norm_weight_offset=1.0, embedding_multiplier=4.0), True),
    "gpt2+sp": (GPT2_LIKE, True),
}


def _join(rank, world, port):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    init_distributed("cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_close_dicts(ours: dict, reference: dict, what: str) -> None:
    assert ours.keys() == reference.keys(), what
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-5, msg=f"{what}: {name}")


def _equal_to_one_process(rank, world, port):
    """Every rank builds the single-process reference itself and compares against it."""
    _join(rank, world, port)
    try:
        ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))
        for name, (overrides, sequence_parallel) in LAYOUTS.items():
            reference, sharded = tiny_model(**overrides), tiny_model(**overrides)
            parallelize_transformer(sharded, sequence_parallel=sequence_parallel)
            assert sharded.config.num_heads == reference.config.num_heads // world, name
            assert sharded.tensor_parallel.vocab_parallel_head == (not name.startswith("gpt2"))

            # Logits, then one training step: loss, backward, clipping, AdamW.
            for model in (reference, sharded):
                model.train()
            reference_loss = causal_lm_loss(reference(ids).logits, ids)
            sharded_logits = sharded(ids).logits
            torch.testing.assert_close(sharded_logits, reference(ids).logits, rtol=0, atol=1e-5, msg=name)
            sharded_loss = causal_lm_loss(sharded_logits, ids)
            reference_loss.backward()
            sharded_loss.backward()
            assert abs(sharded_loss.item() - reference_loss.item()) <= 1e-5
            reference_grads = {n: p.grad for n, p in reference.named_parameters()}
            _assert_close_dicts(full_gradients(sharded), reference_grads, f"{name} gradients")

            # A clip small enough to bite, so the norm and the scaling are both exercised.
            reference_norm, sharded_norm = clip_whole(reference, 0.05), clip_gradients(sharded, 0.05)
            assert abs(reference_norm - sharded_norm) <= 1e-5 * max(1.0, reference_norm), name
            # SGD: an update linear in the gradient. AdamW's first step, lr * g / (|g| + eps),
            # turns a 1e-8 difference in a near-zero gradient into one of order lr.
            for model in (reference, sharded):
                torch.optim.SGD(model.parameters(), lr=0.5).step()
            _assert_close_dicts(full_state_dict(sharded), dict(reference.state_dict()), f"{name} weights after a step")

        # The gathered copy is a plain model with the same outputs.
        sharded = parallelize_transformer(tiny_model().eval())
        copy = unsharded_copy(sharded)
        torch.testing.assert_close(copy(ids).logits, tiny_model().eval()(ids).logits, rtol=0, atol=1e-6)

        # A degree that does not divide the key/value heads is refused before the weights change.
        mqa = tiny_model(num_kv_heads=1)
        before = {n: t.clone() for n, t in mqa.state_dict().items()}
        with pytest.raises(TensorParallelError, match=r"does not divide num_kv_heads \(1\).*accepted degrees: 1$"):
            parallelize_transformer(mqa)
        _assert_close_dicts(dict(mqa.state_dict()), before, "refused model untouched")
        with pytest.raises(TensorParallelError, match="must equal the number of processes"):
            tensor_parallel_mesh(degree=1)
        with pytest.raises(TensorParallelError, match="mixture-of-experts router"):
            parallelize_transformer(tiny_model(num_experts=4), sequence_parallel=True)
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_two_process_tensor_parallel_equals_one_process():
    mp.spawn(_equal_to_one_process, args=(2, _free_port()), nprocs=2, join=True)


def test_fused_rows_are_reordered_into_whole_heads_per_rank():
    # q has 4 rows, k and v 2 each: rank 0 gets q rows 0-1, k row 4, v row 6.
    order = fused_row_order((4, 2, 2), 2)
    assert order.tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    assert fused_row_order((3, 3), 1).tolist() == list(range(6))


def test_degrees_that_split_a_head_or_the_mlp_are_refused():
    config = tiny_model().config  # 4 query heads, 2 key/value heads, intermediate 48
    assert accepted_degrees(config) == [1, 2]
    check_tensor_parallel(config, 2)
    with pytest.raises(
        TensorParallelError, match=r"degree 4 does not divide num_kv_heads \(2\) of .*accepted degrees: 1, 2$"
    ):
        check_tensor_parallel(config, 4)
    odd = Config(**(config.to_dict() | dict(intermediate_size=50, num_heads=6, num_kv_heads=6, head_dim=8)))
    with pytest.raises(TensorParallelError, match=r"num_heads \(6\), num_kv_heads \(6\), intermediate_size \(50\)"):
        check_tensor_parallel(odd, 4)
    with pytest.raises(TensorParallelError, match="positive integer"):
        check_tensor_parallel(config, 0)
    local = local_config(config, 2)
    assert (local.num_heads, local.num_kv_heads, local.head_dim, local.intermediate_size) == (2, 1, 8, 24)


def test_sharding_needs_a_process_group():
    with pytest.raises(TensorParallelError, match="launch with torchrun"):
        parallelize_transformer(tiny_model())


@pytest.mark.slow
def test_torchrun_generate_tensor_parallel_matches_one_process(text_model_dir, capsys):
    """Greedy tokens of two sharded processes (each caching its own heads) equal one process's."""
    from genforge.cli import main

    flags = ["generate", "--model", str(text_model_dir), "--temperature", "0", "--max-new-tokens", "10"]
    flags += ["--prompt", "hello there", "--prompt", "a longer prompt, with more words in it"]
    assert main(flags) == 0
    expected = capsys.readouterr().out
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-port", str(_free_port()), "-m", "genforge.cli", *flags, "--tensor-parallel"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == expected  # printed once, by rank 0
    assert len(expected.splitlines()) == 2


def test_generate_tensor_parallel_outside_torchrun_is_refused(text_model_dir, monkeypatch, capsys):
    from genforge.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    flags = ["generate", "--model", str(text_model_dir), "--prompt", "hi", "--max-new-tokens", "2"]
    assert main([*flags, "--tensor-parallel"]) == 2
    assert "launch with torchrun" in capsys.readouterr().err
