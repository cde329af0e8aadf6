"""genforge.train.losses against F.cross_entropy and transformers' own causal-LM loss."""

import pytest
import torch
import torch.nn.functional as F

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
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=-100,
                                label_smoothing=smoothing)
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
    moe = Config(family="mixtral", vocab_size=32, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24,
                 num_experts=4, num_experts_per_token=2)
    ids = torch.randint(0, 32, (2, 5))
    assert moe_auxiliary_loss(Transformer(dense)(ids), dense) is None
    output = Transformer(moe)(ids)
    aux = moe_auxiliary_loss(output, moe)
    assert torch.equal(aux, load_balancing_loss(output.router_logits, 4, 2))
    assert float(aux.detach()) >= 2.0 - 1e-5  # top_k is its minimum
