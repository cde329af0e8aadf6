"""The `genforge` command, end to end on a tiny model with a real tokenizer."""

import json

import pytest
import torch

from genforge.checkpoint import load_model
from genforge.cli import build_parser, main
from genforge.generate.generator import generate
from genforge.generate.sampling import SamplingParams
from genforge.inference import pack_for_cpu_inference
from genforge.tokenizer import Tokenizer


def test_generate_streams_the_library_result(text_model_dir, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(text_model_dir),
                "--prompt",
                "the cache",
                "--max-new-tokens",
                "12",
                "--seed",
                "3",
                "--top-k",
                "50",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out.rstrip("\n")
    tokenizer = Tokenizer.from_dir(text_model_dir)
    expected = generate(
        pack_for_cpu_inference(load_model(text_model_dir)),
        [tokenizer.encode("the cache")],
        SamplingParams(max_new_tokens=12, seed=3, top_k=50),
        tokenizer=tokenizer,
    )[0]
    assert printed == expected.text
    assert all(t < tokenizer.vocab_size for t in expected.token_ids)


def test_generate_batch_prints_json_lines(text_model_dir, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(text_model_dir),
                "--prompt",
                "a",
                "--prompt",
                "b c",
                "--max-new-tokens",
                "4",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["a", "b c"]


def test_chat_renders_history_with_the_template(text_model_dir, capsys, monkeypatch):
    answers = iter(["hello there", "/reset", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["chat", "--model", str(text_model_dir), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2


def test_convert_round_trips_and_changes_dtype(text_model_dir, tmp_path):
    assert (
        main(["convert", "--model", str(text_model_dir), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    )
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "bf16" / "tokenizer.json").exists()
    original, converted = load_model(text_model_dir), load_model(tmp_path / "bf16", dtype="float32")
    for (name, a), (_, b) in zip(original.state_dict().items(), converted.state_dict().items()):
        torch.testing.assert_close(b, a.to(torch.bfloat16).float(), msg=name)


def test_bad_flags_give_a_clear_error_and_exit_code(text_model_dir, capsys):
    assert main(["generate", "--model", str(text_model_dir), "--prompt", "x", "--logit-bias", "5"]) == 2
    assert "--logit-bias takes ID=BIAS" in capsys.readouterr().err
    assert main(["generate", "--model", str(text_model_dir), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "--model", str(text_model_dir / "missing"), "--prompt", "x"]) == 2


def test_help_explains_each_command(capsys):
    parser = build_parser()
    for command in ("generate", "chat", "convert", "quickstart"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        assert "usage: genforge " + command in capsys.readouterr().out


def test_generation_config_supplies_unset_flags(text_model_dir, tmp_path, capsys):
    import shutil

    model_dir = shutil.copytree(text_model_dir, tmp_path / "greedy")
    config = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**config, "do_sample": False}))
    outputs = []
    for seed in ("1", "2"):
        assert (
            main(["generate", "--model", str(model_dir), "--prompt", "kv", "--max-new-tokens", "6", "--seed", seed])
            == 0
        )
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]  # greedy: the seed does not matter
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--prompt",
                "kv",
                "--max-new-tokens",
                "6",
                "--seed",
                "1",
                "--temperature",
                "1",
            ]
        )
        == 0
    )  # an explicit flag wins
    assert capsys.readouterr().out != outputs[0]


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path, capsys):
    assert main(["quickstart", "--fast", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "timeit" in out  # "measure how long a snippet of code takes" finds the timeit module
    assert "logits identical" in out
    assert (tmp_path / "demo" / "model.safetensors").exists()


def test_beam_strategy_prints_ranked_hypotheses(text_model_dir, capsys):
    from genforge.generate.beam import beam_search
    from genforge.generate.generator import continuation_text
    from genforge.generate.request import DecodeRequest

    assert (
        main(
            [
                "generate",
                "--model",
                str(text_model_dir),
                "--prompt",
                "kv cache",
                "--strategy",
                "beam",
                "--num-beams",
                "3",
                "--num-return-sequences",
                "2",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2 and lines[0]["score"] >= lines[1]["score"]
    tokenizer = Tokenizer.from_dir(text_model_dir)
    prompt = tokenizer.encode("kv cache")
    model = load_model(text_model_dir)
    eos = [tokenizer.sep_token_id]
    # The padded embedding rows are banned, as the CLI bans them.
    bans = DecodeRequest.resolve(
        model, [prompt], SamplingParams(temperature=0), tokenizer=tokenizer, eos_token_ids=eos
    ).logits_processors()
    [expected] = beam_search(
        model, [prompt], num_beams=3, max_new_tokens=5, num_return_sequences=2, eos_token_ids=eos, processors=bans
    )
    assert [line["completion"] for line in lines] == [
        continuation_text(tokenizer, prompt, h.token_ids) for h in expected
    ]


def test_prompt_lookup_greedy_equals_plain_greedy(text_model_dir, capsys):
    args = [
        "generate",
        "--model",
        str(text_model_dir),
        "--prompt",
        "a b a b a b",
        "--temperature",
        "0",
        "--max-new-tokens",
        "12",
    ]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--strategy", "prompt-lookup"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert "acceptance rate" in captured.err


def test_speculative_with_the_model_as_its_own_draft(text_model_dir, capsys):
    args = [
        "generate",
        "--model",
        str(text_model_dir),
        "--prompt",
        "draft",
        "--temperature",
        "0",
        "--max-new-tokens",
        "8",
    ]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--strategy", "speculative", "--draft", str(text_model_dir)]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert "acceptance rate 1.00" in captured.err
    # Every draft of a model drafting for itself is accepted, however unsure: same text.
    assert main(args + ["--strategy", "speculative", "--draft", str(text_model_dir), "--draft-confidence", "0.9"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain
    assert "acceptance rate 1.00" in captured.err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--strategy", "speculative"], "needs --draft"),
        (["--draft", "x"], "only by --strategy speculative"),
        (["--draft-confidence", "0.5"], "only by --strategy speculative"),
        (["--strategy", "contrastive", "--stop", "x"], "--stop is not supported by --strategy contrastive"),
        (["--num-beam-groups", "2"], "for --strategy diverse-beam"),
    ],
)
def test_strategy_flag_mistakes_are_refused_before_loading(flags, message, capsys, tmp_path):
    # The model directory does not exist: the flag error must come first.
    (tmp_path / "generation_config.json").write_text("{}")
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", *flags]) == 2
    assert message in capsys.readouterr().err


def test_eval_metrics_matches_the_library(tmp_path, capsys):
    import sacrebleu

    predictions = ["the cat sat on the mat", "a quick brown fox"]
    references = ["the cat is on the mat", "the quick brown fox"]
    (tmp_path / "pred.txt").write_text("\n".join(predictions) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(references) + "\n")
    assert (
        main(
            [
                "eval",
                "metrics",
                "--pred",
                str(tmp_path / "pred.txt"),
                "--ref",
                str(tmp_path / "ref.txt"),
                "--metrics",
                "bleu,rouge",
                "--out",
                str(tmp_path / "report.json"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["bleu"]["score"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert "| bleu |" in capsys.readouterr().out
    (tmp_path / "short.txt").write_text("only one line\n")
    assert main(["eval", "metrics", "--pred", str(tmp_path / "pred.txt"), "--ref", str(tmp_path / "short.txt")]) == 2
    assert "has 2 lines but" in capsys.readouterr().err
    assert main(["eval", "metrics", "--pred", str(tmp_path / "pred.txt"), "--metrics", "blue"]) == 2
    assert "accepted: bleu" in capsys.readouterr().err


def test_eval_ppl_prints_perplexity(text_model_dir, tmp_path, capsys):
    (tmp_path / "text.txt").write_text("the key value cache stores past keys and values. " * 8)
    assert (
        main(
            [
                "eval",
                "ppl",
                "--model",
                str(text_model_dir),
                "--text",
                str(tmp_path / "text.txt"),
                "--max-length",
                "32",
                "--stride",
                "16",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["perplexity"] > 1 and result["windows"] > 1


def test_watermarked_generation_is_detected(text_model_dir, tmp_path, capsys):
    base = ["generate", "--model", str(text_model_dir), "--prompt", "x", "--max-new-tokens", "80", "--seed", "5"]
    assert main(base + ["--watermark", "42", "--watermark-delta", "8"]) == 0
    (tmp_path / "marked.txt").write_text(capsys.readouterr().out)
    assert main(base) == 0
    (tmp_path / "plain.txt").write_text(capsys.readouterr().out)
    verdicts = {}
    for name in ("marked", "plain"):
        assert (
            main(
                [
                    "watermark",
                    "detect",
                    "--model",
                    str(text_model_dir),
                    "--text",
                    str(tmp_path / f"{name}.txt"),
                    "--key",
                    "42",
                ]
            )
            == 0
        )
        verdicts[name] = json.loads(capsys.readouterr().out)
    assert verdicts["marked"]["watermarked"] and not verdicts["plain"]["watermarked"]


def test_contrastive_strategies_run_from_the_cli(text_model_dir, capsys):
    base = [
        "generate",
        "--model",
        str(text_model_dir),
        "--prompt",
        "x y",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    ]
    assert main(base) == 0
    greedy = capsys.readouterr().out
    assert main(base + ["--strategy", "contrastive", "--penalty-alpha", "0"]) == 0
    assert capsys.readouterr().out == greedy  # alpha 0 is greedy
    assert main(base + ["--strategy", "contrastive-decoding", "--amateur", str(text_model_dir)]) == 0
    assert capsys.readouterr().out.strip()
    assert main(base + ["--strategy", "contrastive-decoding"]) == 2
    assert "needs --amateur" in capsys.readouterr().err


def test_eval_harness_writes_the_library_results(text_model_dir, tmp_path, capsys):
    from genforge.evaluate import evaluate

    docs = [
        {"question": "Which pet?", "choices": ["cat", "dog"], "label": 0},
        {"question": "Which animal?", "choices": ["a", "elephant"], "label": 1},
    ]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "task.yaml").write_text(
        "task: pets\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data.jsonl\ntest_split: test\n"
        'output_type: multiple_choice\ndoc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: label\n'
        "doc_to_choice: choices\n"
    )
    assert (
        main(
            [
                "eval",
                "harness",
                "--model",
                str(text_model_dir),
                "--tasks",
                str(tmp_path / "task.yaml"),
                "--out",
                str(tmp_path / "results"),
            ]
        )
        == 0
    )
    assert "| pets |" in capsys.readouterr().out
    written = json.loads((tmp_path / "results" / "results.json").read_text())
    expected = evaluate(load_model(text_model_dir), Tokenizer.from_dir(text_model_dir), [tmp_path / "task.yaml"])
    assert written["pets"] == json.loads(json.dumps(expected["pets"].to_dict(False)))
    assert main(["eval", "harness", "--model", str(text_model_dir), "--tasks", str(tmp_path / "missing.yaml")]) == 2


def test_eval_judge_ranks_models_and_reports_kappa(tmp_path, capsys):
    from genforge.evaluate import Battle, bradley_terry

    # strong beats medium beats weak, mostly.
    battles = (
        [("strong", "weak", "A")] * 8
        + [("strong", "weak", "B")] * 2
        + [("medium", "weak", "A")] * 6
        + [("medium", "weak", "tie")] * 2
        + [("strong", "medium", "A")] * 5
        + [("strong", "medium", "B")] * 3
    )
    lines = [json.dumps({"model_a": a, "model_b": b, "winner": w}) for a, b, w in battles]
    (tmp_path / "battles.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "human.jsonl").write_text("\n".join(lines) + "\n")  # humans agree on every battle
    assert (
        main(["eval", "judge", "--battles", str(tmp_path / "battles.jsonl"), "--human", str(tmp_path / "human.jsonl")])
        == 0
    )
    out = capsys.readouterr().out
    rows = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ") and "rating" not in line]
    expected = bradley_terry([Battle(*b) for b in battles])
    assert rows == expected.ranking() == ["strong", "medium", "weak"]
    assert "Cohen's kappa 1.000" in out
    (tmp_path / "bad.jsonl").write_text('{"model_a": "x"}\n')
    assert main(["eval", "judge", "--battles", str(tmp_path / "bad.jsonl")]) == 2
    assert "needs model_a, model_b and winner" in capsys.readouterr().err


def test_eval_ab_picks_the_test_by_score_type(tmp_path, capsys):
    from scipy import stats

    (tmp_path / "a.txt").write_text("\n".join(["1"] * 40 + ["0"] * 60))
    (tmp_path / "b.txt").write_text("\n".join(["1"] * 60 + ["0"] * 40))
    assert main(["eval", "ab", "--a", str(tmp_path / "a.txt"), "--b", str(tmp_path / "b.txt")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["effect_b_minus_a"] == pytest.approx(0.2) and result["significant"]
    chi2 = stats.chi2_contingency([[40, 60], [60, 40]], correction=False)
    assert result["p_value"] == pytest.approx(chi2.pvalue)  # z^2 is Pearson's chi-square
    scores_a, scores_b = [0.1, 0.4, 0.35, 0.8, 0.5], [0.6, 0.7, 0.55, 0.9, 0.65, 0.75]
    (tmp_path / "a.txt").write_text("\n".join(map(str, scores_a)))
    (tmp_path / "b.txt").write_text("\n".join(map(str, scores_b)))
    assert main(["eval", "ab", "--a", str(tmp_path / "a.txt"), "--b", str(tmp_path / "b.txt")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["p_value"] == pytest.approx(stats.ttest_ind(scores_b, scores_a, equal_var=False).pvalue)
    assert main(["eval", "ab", "--sample-size", "0.65", "0.85"]) == 0
    assert json.loads(capsys.readouterr().out)["n_per_arm"] > 50
    assert main(["eval", "ab", "--a", str(tmp_path / "a.txt")]) == 2


def test_pretrain_trains_exports_and_resumes(text_model_dir, tmp_path, capsys):
    import shutil

    corpus = "the key value cache keeps past keys and values so decoding is fast. " * 40
    (tmp_path / "corpus.txt").write_text(corpus)
    base = [
        "pretrain",
        "--model",
        str(text_model_dir),
        "--text",
        str(tmp_path / "corpus.txt"),
        "--out",
        str(tmp_path / "run"),
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--warmup",
        "1",
        "--eval-every",
        "2",
        "--save-every",
        "2",
        "--val-fraction",
        "0.2",
        "--lr",
        "1e-3",
    ]
    assert main(base + ["--steps", "2"]) == 0
    assert "trained to step 2" in capsys.readouterr().err
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert main(base + ["--steps", "2"]) == 2  # an existing run is never overwritten without --resume
    shutil.rmtree(tmp_path / "run" / "model")
    assert main(base + ["--steps", "4", "--resume"]) == 0
    assert "trained to step 4" in capsys.readouterr().err
    assert main(base + ["--steps", "0"]) == 2


def test_generate_beam_sampling_and_stop_strings_for_beam_and_prompt_lookup(text_model_dir, capsys):
    base = ["generate", "--model", str(text_model_dir), "--prompt", "the weather today is", "--max-new-tokens", "12"]
    assert main(base + ["--strategy", "beam", "--num-beams", "3"]) == 0
    free = capsys.readouterr().out.strip()
    stop = free.split()[len(free.split()) // 2]
    for strategy in (["--strategy", "beam", "--num-beams", "3"], ["--strategy", "prompt-lookup"]):
        assert main(base + strategy + ["--stop", stop]) == 0
        assert stop not in capsys.readouterr().out
    assert (
        main(base + ["--strategy", "beam", "--num-beams", "3", "--do-sample", "--temperature", "0.9", "--seed", "1"])
        == 0
    )
    first = capsys.readouterr().out
    assert (
        main(base + ["--strategy", "beam", "--num-beams", "3", "--do-sample", "--temperature", "0.9", "--seed", "1"])
        == 0
    )
    assert capsys.readouterr().out == first  # seeded beam sampling repeats
    assert main(base + ["--strategy", "contrastive", "--stop", "x"]) == 2
    assert main(base + ["--do-sample"]) == 2
