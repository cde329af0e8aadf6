"""genforge.train.losses against F.cross_entropy and transformers' own causal-LM loss."""

import pytest
import torch
import torch.nn.functional as F
from factories import tiny_encoder, tiny_model

from genforge.checkpoint import load_model
from genforge.config import Config
from genforge.model import Transformer, load_balancing_loss
from genforge.train import causal_lm_loss, count_target_tokens, moe_auxiliary_loss


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_matches_cross_entropy_on_shifted_tensors(smoothing):
    torch.manual_seed(0)
    logits = torch.randn(2, 7, 11)
    labels = torch.randint(0, 11, (2, 7))
    labels[0, 3] = labels[1, 6] = -100
    ours = causal_lm_loss(logits, labels, label_smoothing=smoothing)
    reference = F.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=smoothing
    )
    assert torch.equal(ours, reference)
    total = causal_lm_loss(logits, labels, label_smoothing=smoothing, reduction="sum")
    torch.testing.assert_close(total / count_target_tokens(labels), ours)


def test_matches_transformers_loss_for_llama(hf_model_dir):
    hf_model, directory = hf_model_dir("llama")
    model = load_model(directory)
    torch.manual_seed(1)
    ids = torch.randint(0, 96, (2, 9))
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that does not count
    with torch.no_grad():
        theirs = hf_model(input_ids=ids, labels=labels).loss
        ours = causal_lm_loss(model(ids).logits, labels)
    assert abs(float(ours) - float(theirs)) <= 1e-5


def test_bad_shapes_and_settings_are_rejected():
    with pytest.raises(ValueError, match="labels"):
        causal_lm_loss(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="label_smoothing"):
        causal_lm_loss(torch.zeros(1, 5, 3), torch.zeros(1, 5, dtype=torch.long), label_smoothing=1.0)


def test_moe_auxiliary_loss_only_with_experts():
    torch.manual_seed(0)
    dense = Config(family="llama", vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24)
    moe = Config(
        family="mixtral",
        vocab_size=32,
        hidden_size=16,
        num_layers=2,
        num_heads=2,
        intermediate_size=24,
        num_experts=4,
        num_experts_per_token=2,
    )
    ids = torch.randint(0, 32, (2, 5))
    assert moe_auxiliary_loss(Transformer(dense)(ids), dense) is None
    output = Transformer(moe)(ids)
    aux = moe_auxiliary_loss(output, moe)
    assert torch.equal(aux, load_balancing_loss(output.router_logits, 4, 2))
    assert float(aux.detach()) >= 2.0 - 1e-5  # top_k is its minimum


# --------------------------------------------------------------- fused linear cross-entropy
from genforge.train.losses import fused_linear_cross_entropy, shift_labels  # noqa: E402


def _head_case(seed=0, batch=3, seq=13, width=16, vocab=50, bias=True):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seq, width, generator=generator).requires_grad_()
    weight = (torch.randn(vocab, width, generator=generator) * 0.3).requires_grad_()
    head_bias = (torch.randn(vocab, generator=generator) * 0.1).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[0, 2:6] = -100  # scattered ignored positions
    labels[1] = -100  # a whole row ignored
    return hidden, weight, head_bias, labels


def _unfused(hidden, weight, bias, labels, **kwargs):
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), **kwargs)


def _loss_and_grads(loss_fn, tensors, scale=1.7):
    loss = loss_fn()
    grads = torch.autograd.grad(loss * scale, [t for t in tensors if t is not None])
    return loss.detach(), grads


@pytest.fixture(params=["onednn", "torch-mm"])
def head_products(request, monkeypatch):
    """Both ways the fused head multiplies on CPU fp32: oneDNN (where present) and torch's mm."""
    from genforge.train import losses

    if request.param == "torch-mm":
        monkeypatch.setattr(losses.torch.backends.mkldnn, "is_available", lambda: False)
    elif not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    product = losses._HeadProducts(torch.zeros(4, 3), None, rows=2, want_hidden=True)
    assert product.onednn == (request.param == "onednn")
    return request.param


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_head_loss_and_gradients_match_the_unfused_ones(reduction, smoothing, bias, head_products):
    hidden, weight, head_bias, labels = _head_case(bias=bias)
    tensors = (hidden, weight, head_bias)
    # 13 * 3 = 39 positions, 26 counted: chunks of 4 leave a short last one
    ours, our_grads = _loss_and_grads(
        lambda: fused_linear_cross_entropy(
            hidden, weight, labels, bias=head_bias, label_smoothing=smoothing, reduction=reduction, chunk_tokens=4
        ),
        tensors,
    )
    theirs, their_grads = _loss_and_grads(
        lambda: _unfused(hidden, weight, head_bias, labels, label_smoothing=smoothing, reduction=reduction), tensors
    )
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-6)
    for mine, reference, tensor in zip(our_grads, their_grads, [t for t in tensors if t is not None]):
        assert mine.shape == tensor.shape and mine.dtype == tensor.dtype
        torch.testing.assert_close(mine, reference, atol=1e-4, rtol=1e-5)
    # ignored positions get no gradient at all
    assert not our_grads[0][1].any() and not our_grads[0][0, 2:6].any()


@pytest.mark.parametrize("chunk", [1, 5, 26, 1000])
def test_fused_head_result_does_not_depend_on_the_chunk_size(chunk, head_products):
    hidden, weight, head_bias, labels = _head_case(seed=1)
    tensors = (hidden, weight, head_bias)
    reference = _loss_and_grads(lambda: _unfused(hidden, weight, head_bias, labels, label_smoothing=0.05), tensors)
    ours = _loss_and_grads(
        lambda: fused_linear_cross_entropy(
            hidden, weight, labels, bias=head_bias, label_smoothing=0.05, chunk_tokens=chunk
        ),
        tensors,
    )
    torch.testing.assert_close(ours[0], reference[0], atol=1e-5, rtol=1e-6)
    for mine, theirs in zip(ours[1], reference[1]):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-5)


def test_fused_head_takes_strided_inputs(head_products):
    hidden, weight, head_bias, labels = _head_case(seed=8)
    strided_hidden = (
        hidden.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    )  # (seq, batch) storage
    strided_weight = weight.detach().t().contiguous().t().requires_grad_()  # column-major
    tensors = (strided_hidden, strided_weight, head_bias)
    ours = _loss_and_grads(
        lambda: fused_linear_cross_entropy(strided_hidden, strided_weight, labels, bias=head_bias, chunk_tokens=7),
        tensors,
    )
    reference = _loss_and_grads(lambda: _unfused(strided_hidden, strided_weight, head_bias, labels), tensors)
    torch.testing.assert_close(ours[0], reference[0], atol=1e-5, rtol=1e-6)
    for mine, theirs in zip(ours[1], reference[1]):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-5)


def test_fused_causal_loss_follows_the_label_shift_convention():
    hidden, weight, _, labels = _head_case(seed=2, bias=False)
    with torch.no_grad():
        ours = fused_linear_cross_entropy(hidden, weight, shift_labels(labels), reduction="sum")
        theirs = causal_lm_loss(F.linear(hidden, weight), labels, reduction="sum")
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-6)


def test_fused_head_with_tied_embedding_accumulates_both_gradients(head_products):
    torch.manual_seed(3)
    vocab, width = 40, 12
    ids = torch.randint(0, vocab, (2, 9))
    labels = shift_labels(ids)

    def run(fused):
        embedding = torch.nn.Embedding(vocab, width)
        with torch.no_grad():
            embedding.weight.copy_(torch.randn(vocab, width, generator=torch.Generator().manual_seed(4)))
        hidden = torch.tanh(embedding(ids))  # the weight enters twice: as the embedding and as the head
        if fused:
            loss = fused_linear_cross_entropy(hidden, embedding.weight, labels, chunk_tokens=5)
        else:
            loss = causal_lm_loss(F.linear(hidden, embedding.weight), ids)
        loss.backward()
        return loss.detach(), embedding.weight.grad

    (ours, our_grad), (theirs, their_grad) = run(True), run(False)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(our_grad, their_grad, atol=1e-5, rtol=1e-5)
    # both paths contribute: the embedding rows of the inputs and every head row
    assert our_grad[ids.unique()].abs().sum(dim=1).min() > 0


def test_fused_head_with_every_label_ignored(head_products):
    hidden, weight, head_bias, labels = _head_case(seed=5)
    labels.fill_(-100)
    tensors = (hidden, weight, head_bias)
    for reduction in ("mean", "sum"):
        ours, our_grads = _loss_and_grads(
            lambda reduction=reduction: fused_linear_cross_entropy(
                hidden, weight, labels, bias=head_bias, reduction=reduction
            ),
            tensors,
        )
        theirs, _ = _loss_and_grads(
            lambda reduction=reduction: _unfused(hidden, weight, head_bias, labels, reduction=reduction), tensors
        )
        # mean over no tokens is NaN, as F.cross_entropy says; the sum is 0; no gradient either way
        torch.testing.assert_close(ours, theirs, equal_nan=True)
        assert all(not g.any() for g in our_grads)


def test_fused_head_without_gradients_gives_the_loss_only():
    hidden, weight, head_bias, labels = _head_case(seed=6)
    with torch.no_grad():
        ours = fused_linear_cross_entropy(hidden, weight, labels, bias=head_bias)
        theirs = _unfused(hidden, weight, head_bias, labels)
    assert not ours.requires_grad
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-6)
    # a frozen head (e.g. under PEFT) still passes the gradient to the hidden states
    frozen = weight.detach()
    loss = fused_linear_cross_entropy(hidden, frozen, labels)
    (grad,) = torch.autograd.grad(loss, hidden)
    (expected,) = torch.autograd.grad(_unfused(hidden, frozen, None, labels), hidden)
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-5)


def test_fused_head_under_autocast_does_what_the_unfused_path_does():
    hidden, weight, _, labels = _head_case(seed=7, bias=False)
    tensors = (hidden, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, our_grads = _loss_and_grads(
            lambda: fused_linear_cross_entropy(hidden, weight, shift_labels(labels), chunk_tokens=6), tensors
        )
        theirs, their_grads = _loss_and_grads(lambda: causal_lm_loss(F.linear(hidden, weight), labels), tensors)
    exact, _ = _loss_and_grads(lambda: causal_lm_loss(F.linear(hidden, weight), labels), tensors)
    assert ours.dtype == theirs.dtype == torch.float32
    # the head runs in bf16 (so it differs from fp32 as much as the unfused bf16 head does), the softmax in fp32
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=1e-3)
    assert abs(float(ours - exact)) > 0 and abs(float(theirs - exact)) > 0
    for mine, reference in zip(our_grads, their_grads):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, reference, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(labels=torch.zeros(3, 12, dtype=torch.long)), "labels must have"),
        (dict(labels=torch.zeros(3, 13)), "int64"),
        (dict(hidden=torch.zeros(3, 13, 15)), "hidden_size"),
        (dict(weight=torch.zeros(50)), "weight must be"),
        (dict(bias=torch.zeros(49)), "bias must be"),
        (dict(label_smoothing=1.0), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(reduction="none"), "reduction"),
        (dict(chunk_tokens=0), "chunk_tokens"),
        (dict(labels=torch.full((3, 13), 50)), "outside the vocabulary"),
        (dict(hidden=torch.zeros(3, 13, 16, dtype=torch.float64)), "dtype"),
    ],
)
def test_fused_head_rejects_bad_input(change, message):
    hidden, weight, head_bias, labels = _head_case()
    arguments = dict(hidden=hidden.detach(), weight=weight.detach(), labels=labels, bias=head_bias.detach())
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        fused_linear_cross_entropy(**arguments)


class _UnfusedTrainer:
    """A Trainer whose step computes the full logits and the unfused loss (the FSDP path)."""

    @staticmethod
    def make(*args, **kwargs):
        from genforge.train import Trainer

        class Unfused(Trainer):
            _fused_head = False

        return Unfused(*args, **kwargs)


@pytest.mark.parametrize("kind", ["causal", "masked"])
def test_trainer_step_with_the_fused_head_equals_the_unfused_step(kind, tmp_path):
    import copy

    from genforge.train import TokenDataset, TrainConfig, Trainer

    if kind == "causal":
        model = tiny_model(seed=0, max_position_embeddings=32, tie_word_embeddings=True)
        extra = {}
    else:
        model = tiny_encoder(seed=0, max_position_embeddings=32)
        extra = dict(mask_token_id=4, special_token_ids=(0, 1, 2, 3, 4), mlm_probability=0.3)
    data = TokenDataset(torch.randint(5, 64, (16 * 12,), generator=torch.Generator().manual_seed(1)), 16)
    val = TokenDataset(torch.randint(5, 64, (16 * 8,), generator=torch.Generator().manual_seed(2)), 16)
    settings = dict(
        max_steps=3, batch_size=4, grad_accum=2, lr=1e-2, label_smoothing=0.1, progress=False, export=False, **extra
    )
    fused = Trainer(copy.deepcopy(model), data, TrainConfig(out_dir=tmp_path / "a", **settings), val_data=val)
    unfused = _UnfusedTrainer.make(
        copy.deepcopy(model), data, TrainConfig(out_dir=tmp_path / "b", **settings), val_data=val
    )
    assert fused._fused_head and not unfused._fused_head
    # The gradients of one micro-batch's share of the loss (what the step accumulates) ...
    batch = data.sequences[:4]
    for trainer in (fused, unfused):
        ((inputs, labels, _),) = trainer._micro_batches([batch])
        trainer._micro_loss(inputs, labels, total_tokens=trainer._count_targets(labels) * 2).backward()
    for (name, mine), theirs in zip(fused.model.named_parameters(), unfused.model.parameters()):
        assert mine.grad is not None and mine.grad.abs().sum() > 0, name
        torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-6, rtol=1e-4, msg=name)
        mine.grad = theirs.grad = None
    # ... and whole steps with accumulation, clipping and AdamW (weights are not compared after
    # it: Adam's normalised update turns float-rounding sign flips of near-zero gradients into
    # lr-sized differences).
    for trainer in (fused, unfused):
        torch.manual_seed(5)
        trainer.result = [trainer.train_step(trainer._next_batches()) for _ in range(2)]
    for mine, theirs in zip(fused.result, unfused.result):
        assert abs(mine["loss"] - theirs["loss"]) < 1e-5
        assert abs(mine["grad_norm"] - theirs["grad_norm"]) < 1e-4 * theirs["grad_norm"]
    ours, reference = fused.evaluate(), unfused.evaluate()
    assert abs(ours["val_loss"] - reference["val_loss"]) < 1e-5
