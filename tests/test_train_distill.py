"""Knowledge distillation: `distillation_loss` against the divergences written out independently
(torch's `kl_div`, probabilities by hand, a two-token case worked on paper), gradients included;
and the Trainer with a teacher (alpha = 0 is the plain step exactly, the student moves towards the
teacher, the teacher stays frozen and out of checkpoints, resume stays bit-exact, bad input)."""

import functools
import json
import math
from pathlib import Path

import factories
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import genforge.train.trainer as trainer_module
from genforge.train import DISTILLATION_KINDS, TokenDataset, TrainConfig, Trainer, TrainError, distillation_loss
from genforge.train.losses import IGNORE_INDEX, causal_lm_loss, shift_labels

SEQ_LEN = 16
VOCAB = 64


# ------------------------------------------------------------------------------ the loss
def reference(student, teacher, temperature, kind, beta=0.5):
    """Per-position divergence times T^2, written from the definitions with probabilities."""
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    if kind == "forward_kl":
        value = (p * (p.log() - q.log())).sum(-1)
    elif kind == "reverse_kl":
        value = (q * (q.log() - p.log())).sum(-1)
    elif kind == "tvd":
        value = 0.5 * (p - q).abs().sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        value = beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)
    return value * temperature**2


def logits_pair(seed=0, shape=(3, 5, 11)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * 2, torch.randn(shape, generator=generator) * 2


def test_two_token_case_worked_by_hand():
    # Teacher p = (1/2, 1/2); student q = (3/4, 1/4) from logits (log 3, 0).
    student = torch.tensor([[math.log(3.0), 0.0]])
    teacher = torch.tensor([[0.0, 0.0]])
    expected = {
        "forward_kl": 0.5 * math.log(4 / 3),
        "reverse_kl": 0.75 * math.log(1.5) + 0.25 * math.log(0.5),
        "tvd": 0.25,
        "jsd": 0.5 * (0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375))
        + 0.5 * (0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)),
    }
    for kind, value in expected.items():
        assert distillation_loss(student, teacher, kind=kind).item() == pytest.approx(value, rel=1e-6), kind
    # Temperature 2 on logits twice as large is the same distributions, times T^2 = 4.
    assert distillation_loss(2 * student, 2 * teacher, temperature=2.0).item() == pytest.approx(
        4 * expected["forward_kl"]
    )


def test_forward_kl_matches_torch_kl_div_with_temperature():
    student, teacher = logits_pair()
    for temperature in (0.5, 1.0, 3.0):
        log_q = F.log_softmax(student / temperature, -1).reshape(-1, student.shape[-1])
        log_p = F.log_softmax(teacher / temperature, -1).reshape(-1, student.shape[-1])
        # "batchmean" over positions is the mean of per-position KL(p || q), Hinton's soft loss.
        want = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True) * temperature**2
        got = distillation_loss(student, teacher, temperature=temperature)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", DISTILLATION_KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_every_kind_and_its_gradient_match_the_definition(kind, temperature):
    student, teacher = logits_pair(seed=1)
    labels = torch.randint(0, 11, student.shape[:-1], generator=torch.Generator().manual_seed(2))
    labels[0, :2] = IGNORE_INDEX
    labels[2, -1] = IGNORE_INDEX
    keep = labels != IGNORE_INDEX
    beta = 0.3

    mine_s, mine_t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    got = distillation_loss(mine_s, mine_t, labels, temperature=temperature, kind=kind, beta=beta, reduction="sum")
    got.backward()
    ref_s, ref_t = student.double().requires_grad_(), teacher.double().requires_grad_()
    want = reference(ref_s, ref_t, temperature, kind, beta)[keep].sum()
    want.backward()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine_s.grad.double(), ref_s.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mine_t.grad.double(), ref_t.grad, rtol=1e-4, atol=1e-6)
    assert not mine_s.grad[~keep].any()  # ignored positions get no gradient

    mean = distillation_loss(student, teacher, labels, temperature=temperature, kind=kind, beta=beta)
    torch.testing.assert_close(mean.double(), want.detach() / keep.sum(), rtol=1e-5, atol=1e-6)
    per_position = distillation_loss(
        student, teacher, labels, temperature=temperature, kind=kind, beta=beta, reduction="none"
    )
    assert per_position.shape == labels.shape and not per_position[~keep].any()
    torch.testing.assert_close(
        per_position.double()[keep], reference(student, teacher, temperature, kind, beta)[keep], rtol=1e-5, atol=1e-6
    )


def test_forward_kl_gradient_is_temperature_times_q_minus_p():
    # d/dz [T^2 KL(p || softmax(z / T))] = T (q - p): the T^2 factor keeps the gradient's scale.
    student, teacher = logits_pair(seed=3, shape=(4, 7))
    for temperature in (1.0, 4.0):
        z = student.clone().requires_grad_()
        distillation_loss(z, teacher, temperature=temperature, reduction="sum").backward()
        q, p = torch.softmax(student / temperature, -1), torch.softmax(teacher / temperature, -1)
        torch.testing.assert_close(z.grad, temperature * (q - p), rtol=1e-5, atol=1e-6)


def test_identical_distributions_cost_nothing_and_half_precision_is_scored_in_fp32():
    student, _ = logits_pair(seed=4)
    for kind in DISTILLATION_KINDS:
        assert distillation_loss(student, student.clone(), kind=kind).item() == pytest.approx(0.0, abs=1e-6)
    s, t = logits_pair(seed=5)
    got = distillation_loss(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, distillation_loss(s.bfloat16().float(), t.bfloat16().float()))


def test_bad_input_is_refused_with_what_is_accepted():
    student, teacher = logits_pair()
    cases = [
        (dict(teacher_logits=teacher[..., :7]), "share the vocabulary"),
        (dict(teacher_logits=teacher[:2]), "same shape"),
        (dict(teacher_logits=teacher[0]), "same number of dimensions"),
        (dict(temperature=0.0), "temperature must be a finite number > 0"),
        (dict(temperature=-1.0), "temperature must be a finite number > 0"),
        (dict(temperature=float("inf")), "temperature must be a finite number > 0"),
        (dict(kind="kl"), "accepted: forward_kl, reverse_kl, tvd, jsd"),
        (dict(kind="jsd", beta=1.0), r"beta must be in \(0, 1\)"),
        (dict(reduction="batchmean"), "reduction must be 'mean', 'sum' or 'none'"),
        (dict(labels=torch.zeros(3, 4, dtype=torch.long)), "labels must have the logits' leading shape"),
        (dict(student_logits=torch.zeros(3, 5, 11, dtype=torch.long)), "floating point"),
    ]
    for change, message in cases:
        arguments = dict(student_logits=student, teacher_logits=teacher)
        arguments.update(change)
        with pytest.raises(ValueError, match=message):
            distillation_loss(**arguments)


# ----------------------------------------------------------------------------- the trainer
# The decoder of factories.py with its special tokens named.
tiny_model = functools.partial(factories.tiny_model, bos_token_id=1, eos_token_id=2)


def sharp_teacher(seed=7):
    """A teacher whose next-token distributions are far from uniform (a random init's are
    nearly uniform, which any student matches from the start)."""
    teacher = tiny_model(seed, num_layers=3, hidden_size=48, intermediate_size=64)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)
    return teacher


def corpus(n_tokens=640, seed=0):
    return torch.randint(3, VOCAB, (n_tokens,), generator=torch.Generator().manual_seed(seed))


def make(out_dir, model=None, teacher=None, **overrides):
    settings = dict(
        out_dir=out_dir, max_steps=6, batch_size=4, lr=3e-3, warmup_steps=1, seed=3, progress=False, export=False
    )
    settings.update(overrides)
    model = model if model is not None else tiny_model()
    return Trainer(
        model,
        TokenDataset(corpus(), SEQ_LEN),
        TrainConfig(**settings),
        val_data=TokenDataset(corpus(160, seed=1), SEQ_LEN),
        teacher=teacher,
    )


def student_teacher_kl(student, teacher, batch):
    with torch.no_grad():
        s, t = student.eval()(batch).logits, teacher(batch).logits
    return float(distillation_loss(s[:, :-1], t[:, :-1]))


def test_alpha_zero_is_the_plain_cross_entropy_step_exactly(tmp_path):
    plain = make(tmp_path / "plain")
    plain_result = plain.train()
    distilled = make(tmp_path / "kd", teacher=sharp_teacher(), distill_alpha=0.0)
    distilled_result = distilled.train()
    assert [loss for _, loss in distilled_result.losses] == [loss for _, loss in plain_result.losses]
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, distilled.model.state_dict()[name]), name
    records = [r for r in distilled.read_metrics() if "loss" in r]
    # The KD term is still measured (without gradients) and reported; the loss is the CE alone.
    assert all(r["kd_loss"] > 0 and r["ce_loss"] == pytest.approx(r["loss"], rel=1e-6) for r in records)
    assert distilled_result.evals[-1]["val_loss"] == plain_result.evals[-1]["val_loss"]


def test_the_step_loss_is_the_mix_of_kd_and_cross_entropy(tmp_path):
    teacher = sharp_teacher()
    student = tiny_model()
    trainer = make(
        tmp_path, model=student, teacher=teacher, distill_alpha=0.3, distill_temperature=2.0, distill_kind="tvd"
    )
    batch = trainer.train_data.sequences[:4]
    with torch.no_grad():
        s, t = student(batch).logits, teacher(batch).logits
    ce = causal_lm_loss(s, batch)
    kd = distillation_loss(s, t, shift_labels(batch), temperature=2.0, kind="tvd")
    record = trainer.train_step([batch])
    assert record["loss"] == pytest.approx(float(0.3 * kd + 0.7 * ce), rel=1e-5)
    assert record["ce_loss"] == pytest.approx(float(ce), rel=1e-5)
    assert record["kd_loss"] == pytest.approx(float(kd), rel=1e-5)


def test_sliced_kd_equals_the_whole_batch_at_once(tmp_path, monkeypatch):
    """The KD term goes through the heads a slice of positions at a time (checkpointed), so the
    step never holds every position's logits; the slicing must not change the step."""

    def one_step(directory):
        trainer = make(directory, teacher=sharp_teacher(), distill_alpha=0.7, distill_kind="jsd")
        record = trainer.train_step([trainer.train_data.sequences[:4]])
        return record, trainer.model.state_dict()

    whole, whole_state = one_step(tmp_path / "whole")
    monkeypatch.setattr(trainer_module, "FUSED_CHUNK_ELEMENTS", VOCAB * 7)  # 7 positions a slice, 60 counted
    sliced, sliced_state = one_step(tmp_path / "sliced")
    assert sliced["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert sliced["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    for name, tensor in whole_state.items():
        torch.testing.assert_close(sliced_state[name], tensor, rtol=1e-5, atol=1e-6)


def test_a_distilled_student_moves_towards_its_teacher_more_than_plain_training(tmp_path):
    teacher = sharp_teacher()
    frozen = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    held_out = corpus(256, seed=9).view(-1, SEQ_LEN)
    start = student_teacher_kl(tiny_model(), teacher, held_out)
    steps = dict(max_steps=40, lr=1e-2, warmup_steps=2)

    plain = make(tmp_path / "plain", **steps)
    plain.train()
    distilled = make(tmp_path / "kd", teacher=teacher, distill_alpha=1.0, **steps)
    distilled.train()
    after_plain = student_teacher_kl(plain.model, teacher, held_out)
    after_kd = student_teacher_kl(distilled.model, teacher, held_out)
    assert after_kd < 0.5 * start  # KD halves the distance to the teacher at least
    assert after_kd < 0.5 * after_plain  # plain CE on the same data does much less
    kd_losses = [r["kd_loss"] for r in distilled.read_metrics() if "kd_loss" in r]
    assert sum(kd_losses[-5:]) < 0.5 * sum(kd_losses[:5])
    # The teacher is frozen: in eval mode, no gradients, the weights as they were.
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(tensor, frozen[name]) for name, tensor in teacher.state_dict().items())


class Stop(Exception):
    pass


def test_resume_with_a_teacher_is_bit_exact_and_checkpoints_hold_only_the_student(tmp_path):
    settings = dict(max_steps=6, save_every=3, distill_alpha=0.5, distill_temperature=2.0, distill_kind="reverse_kl")
    straight = make(tmp_path / "straight", model=tiny_model(dropout=0.1), teacher=sharp_teacher(), **settings)
    straight.train()

    def stop(step, path):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        make(tmp_path / "cut", model=tiny_model(dropout=0.1), teacher=sharp_teacher(), **settings).train(
            on_checkpoint=stop
        )
    resumed = make(tmp_path / "cut", model=tiny_model(seed=99, dropout=0.1), teacher=sharp_teacher(), **settings)
    resumed.train(resume=True)

    def records(directory):
        return [json.loads(line) for line in Path(directory, "metrics.jsonl").read_text().splitlines()]

    strip = ("tokens_per_s",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in records(tmp_path / "cut")] == [
        {k: v for k, v in r.items() if k not in strip} for r in records(tmp_path / "straight")
    ]
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    saved = load_file(tmp_path / "straight" / "checkpoints" / "step-00000006" / "model.safetensors")
    student_shapes = {name: tuple(t.shape) for name, t in straight.model.state_dict().items()}
    assert set(saved) <= set(student_shapes)
    assert all(tuple(tensor.shape) == student_shapes[name] for name, tensor in saved.items())


def test_a_teacher_that_cannot_teach_this_student_is_refused_before_training(tmp_path):
    cases = [
        (tiny_model(1, vocab_size=VOCAB + 8), r"teacher's vocab_size \(72\) differs from the model's \(64\)"),
        (tiny_model(1, max_position_embeddings=8), "exceeds the teacher's max_position_embeddings 8"),
        (torch.nn.Linear(4, 4), "teacher must be a genforge Transformer"),
    ]
    for number, (teacher, message) in enumerate(cases):
        with pytest.raises(TrainError, match=message):
            make(tmp_path / str(number), teacher=teacher)
        assert not (tmp_path / str(number)).exists()
    student = tiny_model()
    with pytest.raises(TrainError, match="another model"):
        make(tmp_path / "self", model=student, teacher=student)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(distill_alpha=1.5), r"distill_alpha .* must be in \[0, 1\]"),
        (dict(distill_temperature=0.0), "distill_temperature must be a finite number > 0"),
        (dict(distill_kind="kl"), "accepted: forward_kl, reverse_kl, tvd, jsd"),
        (dict(distill_beta=0.0), r"distill_beta .* must be in \(0, 1\)"),
    ],
)
def test_bad_distillation_settings_are_refused(tmp_path, change, message):
    with pytest.raises(TrainError, match=message):
        make(tmp_path, teacher=sharp_teacher(), **change)


# ------------------------------------------------------------------------- several processes
def _distill_rank(rank, world, port, out_dir, fsdp):
    import os

    from genforge.train.distributed import destroy_distributed, init_distributed

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    init_distributed("cpu")
    try:
        make(out_dir, teacher=sharp_teacher(), fsdp=fsdp, **DISTRIBUTED_RUN).train()
    finally:
        destroy_distributed()


DISTRIBUTED_RUN = dict(max_steps=3, grad_accum=2, distill_alpha=0.6, distill_temperature=1.5, distill_kind="forward_kl")


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_processes_distil_as_one_does(tmp_path, fsdp, one_thread):
    """Under torchrun each rank runs the teacher on its own rows; DDP (fused head) and FSDP (the
    model makes the logits, the unfused KD scores them) give the single process's run."""
    import socket

    import torch.multiprocessing as mp

    make(tmp_path / "single", teacher=sharp_teacher(), **DISTRIBUTED_RUN).train()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distill_rank, args=(2, port, str(tmp_path / "ranks"), fsdp), nprocs=2, join=True)

    def records(directory):
        return [r for r in map(json.loads, Path(directory, "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    single, ranks = records(tmp_path / "single"), records(tmp_path / "ranks")
    assert [r["step"] for r in ranks] == [r["step"] for r in single] == [1, 2, 3]
    for ours, theirs in zip(ranks, single):
        for key in ("loss", "ce_loss", "kd_loss"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (key, ours, theirs)
