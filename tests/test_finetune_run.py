"""genforge.finetune.run: the fine-tuning run over the training loop: packed rows train each
example as alone, checkpoints of a PEFT run hold only the adapter and resume exactly, each
method writes what its users load, multi-task mixtures, refusals before work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from finetune_shared import arithmetic_records, tiny_chat_model_dir
from safetensors.torch import load_file

from genforge.checkpoint import load_model
from genforge.finetune import SFTDataError, SFTDataset, SFTExample, SFTRows, load_adapter
from genforge.finetune.run import METHODS, FinetuneConfig, FinetuneError, finetune, mix_examples, split_held_out
from genforge.loading import load_for_inference
from genforge.quantize.nf4 import quantize_linears_nf4
from genforge.tokenizer import Tokenizer
from genforge.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_chat_model_dir(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in arithmetic_records(120)))
    return path


def _examples(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for number, length in enumerate(lengths):
        ids = torch.randint(1, 64, (length,), generator=generator).tolist()
        labels = [-100] * (length // 2) + ids[length // 2 :]
        examples.append(SFTExample(ids, labels, source=f"example {number}"))
    return examples


def test_packing_places_whole_examples_first_fit():
    rows = SFTRows(_examples([10, 7, 5, 3, 9]), seq_len=16, pad_id=0, packing=True)
    assert [[len(e.input_ids) for e in row] for row in rows.rows] == [[10, 5], [7, 3], [9]]
    batch = rows.batch([0, 2])
    assert batch["input_ids"].shape == (2, 15)  # trimmed to the longest row of the batch
    assert batch["document_ids"][0].tolist() == [0] * 10 + [1] * 5
    assert batch["document_ids"][1].tolist() == [0] * 9 + [-1] * 6
    assert (batch["labels"][1, 9:] == -100).all()
    assert rows.fill == pytest.approx(34 / 48)


def test_packed_rows_score_each_example_as_alone(tmp_path):
    """The held-out loss over packed rows equals the loss over one padded row per example."""
    from factories import tiny_model

    examples = _examples([9, 6, 12, 4, 7, 5])
    losses = []
    for packing in (False, True):
        rows = SFTRows(examples, seq_len=20, pad_id=0, packing=packing)
        config = TrainConfig(out_dir=tmp_path / str(packing), max_steps=1, batch_size=8, progress=False, export=False)
        losses.append(Trainer(tiny_model(4), rows, config, val_data=rows).evaluate()["val_loss"])
    assert len(SFTRows(examples, seq_len=20, pad_id=0, packing=True)) < len(examples)
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_rows_refuse_examples_that_do_not_fit_or_teach_nothing():
    with pytest.raises(SFTDataError, match="example 1: 12 tokens do not fit in seq_len=10"):
        SFTRows(_examples([5, 12]), seq_len=10, pad_id=0)
    with pytest.raises(SFTDataError, match="no token is a target"):
        SFTRows([SFTExample([1, 2, 3], [-100] * 3)], seq_len=10, pad_id=0)


def _config(model_dir, data_file, out_dir, **changes):
    settings = dict(
        model_dir=model_dir,
        data=data_file,
        out_dir=out_dir,
        max_steps=6,
        batch_size=4,
        seq_len=48,
        lr=3e-3,
        eval_fraction=0.1,
        progress=False,
    )
    return FinetuneConfig(**(settings | changes))


def test_lora_run_learns_and_checkpoints_only_the_adapter(model_dir, data_file, tmp_path):
    result = finetune(_config(model_dir, data_file, tmp_path / "run", max_steps=12))
    assert result.val_loss_after < result.val_loss_before
    assert 0 < result.trainable_share < 0.25 and result.held_out_examples == 12
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-00000012" / "model.safetensors")
    assert saved and all(".lora_A." in name or ".lora_B." in name for name in saved)
    assert json.loads((tmp_path / "run" / "finetune.json").read_text())["steps"] == 12
    # the adapter directory loads onto the base and carries the trained weights
    adapted = load_adapter(load_model(model_dir), result.output_dir)
    trained = {n: t for n, t in adapted.state_dict().items() if "lora_" in n}
    assert trained.keys() == saved.keys()
    for name, tensor in trained.items():
        torch.testing.assert_close(tensor, saved[name], atol=0, rtol=0)


def test_resumed_run_equals_an_uninterrupted_one(model_dir, data_file, tmp_path):
    whole = finetune(_config(model_dir, data_file, tmp_path / "whole", save_every=3))
    # The same run stopped after its step-3 checkpoint: rewind a copy to it, then resume.
    shutil.copytree(tmp_path / "whole", tmp_path / "split")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "step-00000006")
    (tmp_path / "split" / "checkpoints" / "latest.json").write_text(json.dumps({"step": 3, "dir": "step-00000003"}))
    resumed = finetune(_config(model_dir, data_file, tmp_path / "split", save_every=3), resume=True)
    assert resumed.val_loss_before == whole.val_loss_before
    assert resumed.val_loss_after == pytest.approx(whole.val_loss_after, abs=1e-6)
    ours = load_file(resumed.output_dir / "adapter_model.safetensors")
    for name, tensor in load_file(whole.output_dir / "adapter_model.safetensors").items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=0)


def test_full_fine_tuning_writes_a_model_directory(model_dir, data_file, tmp_path):
    result = finetune(_config(model_dir, data_file, tmp_path / "full", method="full", max_steps=2, lr=1e-3))
    assert result.trainable_share == 1.0 and result.output_dir.name == "model"
    tuned, base = load_model(result.output_dir), load_model(model_dir)
    assert not torch.equal(tuned.blocks[0].attn.qkv.weight, base.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("method", ["dora", "qlora", "ia3", "bitfit", "adapter", "prompt", "ptuning", "prefix"])
def test_each_method_trains_saves_and_decodes_as_trained(method, model_dir, data_file, tmp_path):
    """Every method lowers the held-out loss, writes what its users load, and that output
    (an adapter put back on the base by `--adapter`, or a model) gives the trained logits."""
    config = _config(model_dir, data_file, tmp_path / method, method=method, max_steps=3, num_virtual_tokens=4)
    result = finetune(config)
    assert result.val_loss_after < result.val_loss_before
    assert 0 < result.trainable_share < 0.5
    if method == "qlora":  # the NF4 weights count as the weights they hold: the share is LoRA's
        lora = finetune(_config(model_dir, data_file, tmp_path / "lora", max_steps=1))
        assert result.trainable_share == pytest.approx(lora.trainable_share)
    probe = torch.tensor([[5, 17, 3, 44, 90, 12]])
    if result.output_dir.name == "model":
        reloaded = load_model(result.output_dir)
    elif method == "qlora":  # trained against the NF4 weights: put back on an NF4 base
        base = load_model(model_dir)
        quantize_linears_nf4(base)
        reloaded = load_adapter(base, result.output_dir)
    else:
        assert (result.output_dir / "adapter_config.json").is_file()
        reloaded = load_for_inference(model_dir, adapter=result.output_dir).model
    trained = load_file(tmp_path / method / "checkpoints" / "step-00000003" / "model.safetensors")
    assert trained  # only the trainable tensors: the frozen base is not copied into checkpoints
    again = METHODS[method].install(load_model(model_dir), config, Tokenizer.from_dir(model_dir))
    again.load_state_dict(trained, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(probe).logits, again.eval()(probe).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", list(METHODS))
def test_gradient_checkpointing_gives_every_method_the_same_gradients(method, model_dir, data_file, tmp_path):
    """The training loop's activation checkpointing (blocks recomputed in backward) leaves each
    method's loss and the gradients of what it trains as they were."""
    config = _config(model_dir, data_file, tmp_path, method=method, num_virtual_tokens=4)
    tokenizer = Tokenizer.from_dir(model_dir)
    examples = SFTDataset.from_jsonl(data_file, tokenizer, max_length=40).examples[:6]
    rows = SFTRows(examples, 40, pad_id=0, packing=not METHODS[method].prompt)
    model = METHODS[method].install(load_model(model_dir), config, tokenizer)
    trainer = Trainer(model, rows, TrainConfig(out_dir=tmp_path / "t", max_steps=1, progress=False, export=False))
    ((inputs, labels, documents),) = trainer._micro_batches([rows.batch(range(len(rows)))])
    runs = []
    for checkpointed in (False, True):
        restore = trainer._enable_gradient_checkpointing() if checkpointed else None
        loss = trainer._micro_loss(inputs, labels, trainer._count_targets(labels), documents)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        runs.append((float(loss.detach()), grads))
        if restore is not None:
            restore()
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-6)
    assert runs[0][1] and runs[0][1].keys() == runs[1][1].keys()
    for name, grad in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_mixture_shares_follow_weights_or_temperature():
    big, small = _examples([4] * 90), _examples([5] * 10)
    count = lambda mixed: sum(len(e.input_ids) == 5 for e in mixed)  # noqa: E731
    assert count(mix_examples([big, small])) == 10  # proportional to size
    assert count(mix_examples([big, small], weights=[1, 1])) == 50
    assert count(mix_examples([big, small], temperature=1e9)) == 50  # large T: uniform over datasets
    assert count(mix_examples([big, small], temperature=2.0)) == round(100 * 10**0.5 / (90**0.5 + 10**0.5))
    with pytest.raises(FinetuneError, match="2 positive numbers"):
        mix_examples([big, small], weights=[1])


def test_held_out_split_is_seeded_and_disjoint():
    examples = _examples(range(3, 23))
    train, held = split_held_out(examples, 0.1, seed=3)
    assert len(held) == 2 and len(train) == 18 and not {id(e) for e in held} & {id(e) for e in train}
    assert split_held_out(examples, 0.1, seed=3)[1] == held


def test_bad_runs_are_refused_before_work(model_dir, data_file, tmp_path):
    with pytest.raises(FinetuneError, match="unknown method 'lorax'; accepted: full, lora"):
        finetune(_config(model_dir, data_file, tmp_path / "a", method="lorax"))
    with pytest.raises(FinetuneError, match="does not exist"):
        finetune(_config(model_dir, tmp_path / "missing.jsonl", tmp_path / "b"))
    with pytest.raises(FinetuneError, match="2 mixture weights for 1 data files"):
        finetune(_config(model_dir, data_file, tmp_path / "c", data_weights=[1, 2]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_runs_lora_and_reports_json(model_dir, data_file, tmp_path, capsys):
    from genforge.cli import main

    out = tmp_path / "cli"
    argv = ["finetune", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), "--steps", "2"]
    assert main(argv + ["--batch-size", "4", "--seq-len", "48", "--rank", "4", "--target-modules", "qkv"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["method"] == "lora" and report["steps"] == 2
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert main(["finetune", "--model", str(model_dir), "--data", str(tmp_path / "no.jsonl"), "--out", str(out)]) == 2
    assert "no.jsonl does not exist" in capsys.readouterr().err


def test_a_lora_on_the_head_is_trained_through_the_unfused_loss(model_dir, tmp_path):
    """The fused head loss reads lm_head.weight alone; with a LoRA on lm_head the step computes
    the logits through the wrapped head instead, so its update gets gradients."""
    from genforge.finetune import LoraConfig, apply_lora

    model = apply_lora(load_model(model_dir), LoraConfig(target_modules=["qkv", "lm_head"], r=2))
    rows = SFTRows(_examples([9, 7, 6]), seq_len=16, pad_id=0)
    trainer = Trainer(model, rows, TrainConfig(out_dir=tmp_path, max_steps=1, progress=False, export=False))
    assert not trainer._fused_head
    trainer.train_step([rows.batch(range(3))])
    assert model.lm_head.lora_B["lm_head"].abs().sum() > 0  # B starts at zero: it moved


@pytest.mark.slow
def test_torchrun_finetune_equals_one_process(model_dir, data_file, tmp_path):
    """`torchrun ... genforge finetune`: two gloo processes, each training its slice of every
    batch, end with the adapter one process trains on the whole batch; rank 0 alone writes."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = ["--data", str(data_file), "--steps", "3", "--batch-size", "4", "--seq-len", "48", "--lr", "3e-3"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    command = launch + ["-m", "genforge.cli", "finetune", "--model", str(model_dir), "--out", str(tmp_path / "ddp")]
    done = subprocess.run(
        command + settings, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert done.returncode == 0, done.stderr[-3000:]
    single = finetune(_config(model_dir, data_file, tmp_path / "one", max_steps=3, eval_fraction=0.05))
    ours = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    for name, tensor in load_file(single.output_dir / "adapter_model.safetensors").items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    steps = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3]
