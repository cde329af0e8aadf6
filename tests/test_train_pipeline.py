"""Pipeline parallelism on CPU with gloo, two processes (two stages) spawned by the test: with
the GPipe and the 1F1B schedule, the loss and every stage's gradients equal the single-process
model on the whole batch within 1e-5, and so do the weights after an SGD step, for a
Llama-style model and for a GPT-2-style one whose tied embedding table lives on both the first
and the last stage. The stages run one after another in one process give the whole model's
logits; splits and micro-batch counts that cannot work are refused with the accepted values."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from factories import tiny_encoder, tiny_model

from genforge.train.distributed import destroy_distributed, init_distributed
from genforge.train.losses import causal_lm_loss
from genforge.train.pipeline import (
    PipelineError,
    PipelineRunner,
    PipelineStageModule,
    bubble_fraction,
    check_pipeline,
    stage_layers,
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
LAYOUTS = {"llama": dict(num_layers=4), "gpt2-tied": dict(num_layers=4, **GPT2_LIKE)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _equal_to_one_process(rank, world, port):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    init_distributed("cpu")
    try:
        ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))
        ids[1, 8:] = -100  # labels that do not count: the micro-batches' token counts differ
        inputs = ids.clamp(min=0)
        for schedule in ("gpipe", "1f1b"):
            for name, overrides in LAYOUTS.items():
                reference, whole = tiny_model(**overrides), tiny_model(**overrides)
                reference_loss = causal_lm_loss(reference(inputs).logits, ids)
                reference_loss.backward()
                runner = PipelineRunner(whole, microbatches=2, schedule=schedule)
                del whole  # the runner keeps this rank's stage only
                loss = runner.step(inputs, labels=ids)
                what = f"{schedule} {name} stage {runner.stage_index}"
                assert abs(loss - reference_loss.item()) <= 1e-5, what
                reference_parameters = dict(reference.named_parameters())
                stage_parameters = dict(runner.named_parameters())
                assert stage_parameters, what
                for parameter_name, parameter in stage_parameters.items():
                    # A tied head's copy on the last stage carries the table's whole gradient.
                    twin = reference_parameters.get(parameter_name, reference_parameters.get("embed_tokens.weight"))
                    torch.testing.assert_close(
                        parameter.grad, twin.grad, rtol=0, atol=1e-5, msg=f"{what} {parameter_name}"
                    )
                # SGD: an update linear in the gradient (AdamW's first step would magnify
                # rounding differences in near-zero gradients to the size of the learning rate).
                for module in (reference, runner.module):
                    torch.optim.SGD(module.parameters(), lr=0.5).step()
                for parameter_name, parameter in stage_parameters.items():
                    twin = reference_parameters.get(parameter_name, reference_parameters.get("embed_tokens.weight"))
                    torch.testing.assert_close(parameter, twin, rtol=0, atol=1e-5, msg=f"{what} {parameter_name} step")
        runner = PipelineRunner(tiny_model(num_layers=4), microbatches=2)
        with pytest.raises(PipelineError, match="do not divide the batch of 3"):
            runner.step(inputs[:3])
    finally:
        destroy_distributed()


@pytest.mark.slow
def test_two_stage_pipeline_equals_one_process_for_both_schedules():
    mp.spawn(_equal_to_one_process, args=(2, _free_port()), nprocs=2, join=True)


@pytest.mark.parametrize("overrides", [dict(num_layers=4), dict(num_layers=4, sliding_window=5), GPT2_LIKE])
def test_stages_in_sequence_give_the_whole_models_logits(overrides):
    model = tiny_model(**overrides).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    stages = [PipelineStageModule(model, index, 2) for index in range(2)]
    hidden = stages[0](ids)
    assert hidden.shape == (2, 12, model.config.hidden_size)
    torch.testing.assert_close(stages[1](hidden), model(ids).logits, rtol=0, atol=1e-6)
    if model.config.tie_word_embeddings:
        assert stages[1].lm_head.weight is not model.embed_tokens.weight  # the last stage's own copy


def test_bad_splits_are_refused_with_what_is_accepted():
    config = tiny_model(num_layers=4).config
    with pytest.raises(PipelineError, match=r"3 pipeline stages do not divide the model's 4 layers.*accepted.*2, 4"):
        check_pipeline(config, 3)
    with pytest.raises(PipelineError, match="at least 2 stages"):
        check_pipeline(config, 1)
    with pytest.raises(PipelineError, match=r"3 micro-batches do not divide the batch of 8.*accepted: 1, 2, 4, 8"):
        check_pipeline(config, 2, batch_size=8, microbatches=3)
    with pytest.raises(PipelineError, match="1F1B schedule needs at least as many micro-batches as stages"):
        check_pipeline(config, 4, batch_size=8, microbatches=2, schedule="1f1b")
    check_pipeline(config, 4, batch_size=8, microbatches=2, schedule="gpipe")
    with pytest.raises(PipelineError, match="accepted: gpipe, 1f1b"):
        check_pipeline(config, 2, schedule="interleaved")
    with pytest.raises(PipelineError, match="bidirectional encoder"):
        check_pipeline(tiny_encoder().config, 2)
    with pytest.raises(PipelineError, match="mixture-of-experts"):
        check_pipeline(tiny_model(num_experts=4).config, 2)
    with pytest.raises(PipelineError, match="launch with torchrun"):
        PipelineRunner(tiny_model(), microbatches=2)


def test_stage_layers_and_bubble():
    assert [list(stage_layers(8, 4, s)) for s in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(4, 28) == pytest.approx(3 / 31)
