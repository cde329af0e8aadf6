"""The lm-eval-style task harness: forced answers on a model built to give them, parity of
log-likelihoods with a direct forward pass, prompts by string, and bad task files."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from genforge.config import Config
from genforge.encoder import default_encoder_path
from genforge.evaluate import MetricError
from genforge.evaluate.harness import (
    encode_pair,
    evaluate,
    evaluate_task,
    generate_until,
    load_task,
    loglikelihood,
    loglikelihood_rolling,
    mean_stderr,
    write_results,
)
from genforge.model import Transformer
from genforge.tokenizer import Tokenizer

HIDDEN = 8


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(default_encoder_path())


def _markov_model(tokenizer):
    """A model whose next-token logits depend only on the last token, set by hand.

    Attention and MLP weights are zero, so the final hidden state is the normalised embedding
    of the last token; embeddings are one-hot "slots" (paris -> 1, "." -> 2, london -> 3,
    every other token -> 0) and the LM head's column k holds the logits after slot k. So
    after any ordinary token the logits are COLUMN0: paris 8, a 5, elephant 4, cat 3, else 0;
    and greedy decoding runs paris -> . -> london -> paris.
    """
    ids = {
        w: tokenizer.encode(w, add_special_tokens=False)[0]
        for w in ("a", "elephant", "cat", "dog", "paris", "london", ".")
    }
    config = Config(
        family="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=HIDDEN,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        intermediate_size=16,
        max_position_embeddings=64,
        eos_token_id=tokenizer.sep_token_id,
    )
    model = Transformer(config)
    columns = {
        0: {"paris": 8.0, "a": 5.0, "elephant": 4.0, "cat": 3.0},
        1: {".": 9.0},
        2: {"london": 9.0},
        3: {"paris": 9.0},
    }
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0 if "norm" in name else 0.0)
        model.embed_tokens.weight[:, 0] = 1.0
        for slot, word in ((1, "paris"), (2, "."), (3, "london")):
            model.embed_tokens.weight[ids[word]] = 0.0
            model.embed_tokens.weight[ids[word], slot] = 1.0
        # rms_norm(one-hot) = sqrt(HIDDEN) * one-hot, so a weight of L / sqrt(HIDDEN) gives logit L.
        for slot, logits in columns.items():
            for word, value in logits.items():
                model.lm_head.weight[ids[word], slot] = value / math.sqrt(HIDDEN)
    model.eval()
    column0 = torch.zeros(tokenizer.vocab_size)
    for word, value in columns[0].items():
        column0[ids[word]] = value
    return model, ids, torch.log_softmax(column0, -1)


@pytest.fixture(scope="module")
def markov(tokenizer):
    return _markov_model(tokenizer)


def _write_task(tmp_path, yaml_text, docs, name="data.jsonl", extra_files=None):
    (tmp_path / name).write_text("".join(json.dumps(d) + "\n" for d in docs))
    for file, file_docs in (extra_files or {}).items():
        (tmp_path / file).write_text("".join(json.dumps(d) + "\n" for d in file_docs))
    path = tmp_path / "task.yaml"
    path.write_text(yaml_text)
    return path


MC_DOCS = [
    {"question": "Which animal?", "choices": ["a", "elephant"], "label": 0},
    {"question": "Which animal?", "choices": ["elephant", "a"], "label": "a"},  # a target given as the choice text
    {"question": "Which pet?", "choices": ["cat", "dog"], "label": 0},
    {"question": "Which pet?", "choices": ["dog", "cat"], "label": 0},
]
MC_YAML = """\
task: animals
dataset_path: json
dataset_kwargs:
  data_files:
    test: data.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{question}}\\nA:"
doc_to_target: label
doc_to_choice: choices
"""


def test_multiple_choice_acc_and_acc_norm_by_hand(tmp_path, tokenizer, markov):
    model, ids, logp = markov
    result = evaluate_task(model, tokenizer, _write_task(tmp_path, MC_YAML, MC_DOCS))
    # Single-token choices after an ordinary token: each log-likelihood is COLUMN0's log-softmax.
    lp = {w: float(logp[ids[w]]) for w in ("a", "elephant", "cat")}
    lp["dog"] = float(logp[tokenizer.encode("dog", add_special_tokens=False)[0]])
    assert result.samples[0]["loglikelihoods"] == pytest.approx([lp["a"], lp["elephant"]], abs=1e-4)
    # "a" is likelier than "elephant" (acc picks it), but per character "elephant" wins:
    assert lp["a"] > lp["elephant"] and lp["a"] / 1 < lp["elephant"] / 8
    # acc per doc: 1, 1, 1, 0; acc_norm: 0, 0, 1, 0.
    assert result.metrics == {"acc": 0.75, "acc_norm": 0.25}
    # Sample stderr: sd with n - 1 = sqrt(0.75 / 3) = 0.5, over sqrt(4).
    assert result.stderr["acc"] == pytest.approx(0.25) and result.stderr["acc_norm"] == pytest.approx(0.25)
    assert result.num_samples == 4 and result.settings["output_type"] == "multiple_choice"
    assert result.samples[0]["prompt"] == "Q: Which animal?\nA:"


def test_choice_list_literal_and_template(tmp_path, tokenizer, markov):
    model, _, _ = markov
    yaml = MC_YAML.replace("doc_to_choice: choices", 'doc_to_choice: ["{{first}}", "elephant"]')
    docs = [{"question": "q?", "first": "a", "label": 0}]
    task = load_task(_write_task(tmp_path, yaml, docs))
    assert task.choices(docs[0]) == ["a", "elephant"]
    yaml = MC_YAML.replace("doc_to_choice: choices", 'doc_to_choice: "{{options}}"')
    task = load_task(_write_task(tmp_path, yaml, [{"question": "q?", "options": ["x", "y"], "label": "1"}]))
    assert task.choices(task.docs[0]) == ["x", "y"] and task.gold_index(task.docs[0]) == 1


def test_loglikelihood_matches_a_direct_forward_pass(text_model_dir, tokenizer):
    from genforge.checkpoint import load_model

    model = load_model(text_model_dir)
    requests = [
        ("Question: what is the capital of france?\nAnswer:", " paris"),
        ("The cat sat on the ", "mat and slept"),  # trailing space moves to the continuation
        ("x", " y z w v"),
        ("", "hello world"),
    ]
    got = loglikelihood(model, tokenizer, requests, batch_size=3)  # two batches, left-padded
    for (context, continuation), (ll, greedy) in zip(requests, got):
        if context:
            context_ids = tokenizer.encode(context.rstrip(), add_special_tokens=False)
            whole = tokenizer.encode(context + continuation, add_special_tokens=False)
            continuation_ids = whole[len(context_ids) :]
        else:  # an empty context is conditioned on the prefix token (here EOS = [SEP])
            context_ids = [model.config.eos_token_id]
            continuation_ids = tokenizer.encode(continuation, add_special_tokens=False)
        ids = torch.tensor([context_ids + continuation_ids])
        with torch.no_grad():
            logp = F.log_softmax(model(ids).logits[0].float(), -1)
        positions = range(len(context_ids) - 1, ids.shape[1] - 1)
        expected = sum(float(logp[p, t]) for p, t in zip(positions, continuation_ids))
        assert ll == pytest.approx(expected, abs=1e-4)
        assert greedy == all(int(logp[p].argmax()) == t for p, t in zip(positions, continuation_ids))
    assert encode_pair(tokenizer, "The cat sat on the ", "mat") == (
        tokenizer.encode("The cat sat on the", add_special_tokens=False),
        tokenizer.encode("mat", add_special_tokens=False),
    )


def test_loglikelihood_task_acc_is_greedy_and_perplexity(tmp_path, tokenizer, markov):
    model, ids, logp = markov
    yaml = (
        MC_YAML.replace("output_type: multiple_choice", "output_type: loglikelihood")
        .replace("doc_to_choice: choices\n", "")
        .replace("doc_to_target: label", "doc_to_target: answer")
    )
    docs = [{"question": "Capital?", "answer": "paris"}, {"question": "Capital?", "answer": "cat"}]
    result = evaluate_task(model, tokenizer, _write_task(tmp_path, yaml, docs))
    assert result.metrics["acc"] == 0.5  # paris is the greedy token, cat is not
    lls = [float(logp[ids["paris"]]), float(logp[ids["cat"]])]
    assert result.metrics["perplexity"] == pytest.approx(math.exp(-sum(lls) / 2), rel=1e-4)


def test_loglikelihood_rolling_word_and_byte_perplexity(tmp_path, text_model_dir, tokenizer):
    from genforge.checkpoint import load_model

    model = load_model(text_model_dir)
    texts = ["the quick brown fox jumps", "over the lazy dog"]
    yaml = (
        "task: corpus\ndataset_kwargs:\n  data_files:\n    validation: data.jsonl\nvalidation_split: validation\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
    )
    result = evaluate_task(model, tokenizer, _write_task(tmp_path, yaml, [{"text": t} for t in texts]))
    # A whole-text log-likelihood equals the log-likelihood of the text after an empty context.
    lls = [ll for ll, _ in loglikelihood(model, tokenizer, [("", t) for t in texts])]
    assert loglikelihood_rolling(model, tokenizer, texts) == pytest.approx(lls, abs=1e-4)
    words, num_bytes = 5 + 4, sum(len(t) for t in texts)
    assert result.metrics["word_perplexity"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-4)
    assert result.metrics["byte_perplexity"] == pytest.approx(math.exp(-sum(lls) / num_bytes), rel=1e-4)
    assert result.metrics["bits_per_byte"] == pytest.approx(-sum(lls) / num_bytes / math.log(2), rel=1e-4)
    assert result.stderr["word_perplexity"] is None and result.settings["words"] == words


def test_generate_until_stops_at_until_and_at_max_gen_toks(tmp_path, tokenizer, markov):
    model, _, _ = markov
    # Greedy from "Capital?" runs paris . london paris . london ...
    assert generate_until(model, tokenizer, ["Capital?"], until=["."], max_gen_toks=10) == [" paris"]
    assert generate_until(model, tokenizer, ["Capital?"], until=["london"], max_gen_toks=10) == [" paris. "]
    long = generate_until(model, tokenizer, ["Capital?"], until=["zebra"], max_gen_toks=4)[0]
    assert long.split() == ["paris.", "london", "paris"]  # 4 tokens: paris . london paris
    yaml = (
        "task: capitals\ndataset_kwargs:\n  data_files:\n    test: data.jsonl\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n    regexes_to_ignore: ['^\\s+']\n  - metric: chrf\n"
    )
    docs = [{"question": "Capital?", "answer": "paris"}, {"question": "Capital?", "answer": "london"}]
    result = evaluate_task(model, tokenizer, _write_task(tmp_path, yaml, docs))
    assert [s["output"] for s in result.samples] == [" paris", " paris"]
    assert result.metrics["exact_match"] == 0.5 and result.stderr["exact_match"] == pytest.approx(0.5)
    assert 0 < result.metrics["chrf"] < 100 and result.stderr["chrf"] is None
    assert result.settings["generation_kwargs"]["until"] == ["."]


FEW_DOCS = [{"q": f"q{i}", "a": f"a{i}"} for i in range(4)]
FEW_YAML = """\
task: fewshot
dataset_kwargs:
  data_files:
    test: data.jsonl
test_split: test
output_type: generate_until
description: "Answer.\\n\\n"
doc_to_text: "Q: {{q}}"
doc_to_target: a
target_delimiter: " -> "
fewshot_delimiter: "\\n##\\n"
num_fewshot: 2
"""


def test_fewshot_prompt_from_the_first_docs(tmp_path):
    task = load_task(_write_task(tmp_path, FEW_YAML, FEW_DOCS))
    rng = random.Random(0)
    assert (
        task.context(FEW_DOCS[0], task.fewshot_examples(0, rng, 2))
        == "Answer.\n\nQ: q1 -> a1\n##\nQ: q2 -> a2\n##\nQ: q0"
    )
    assert (
        task.context(FEW_DOCS[2], task.fewshot_examples(2, rng, 2))
        == "Answer.\n\nQ: q0 -> a0\n##\nQ: q1 -> a1\n##\nQ: q2"
    )  # the doc itself is skipped


def test_fewshot_from_a_split_is_seeded_and_deterministic(tmp_path, tokenizer, markov):
    model, _, _ = markov
    train = [{"q": f"t{i}", "a": f"b{i}"} for i in range(6)]
    yaml = (
        FEW_YAML.replace("test: data.jsonl", "test: data.jsonl\n    train: train.jsonl")
        + "fewshot_split: train\ngeneration_kwargs: {until: ['.'], max_gen_toks: 2}\n"
    )
    path = _write_task(tmp_path, yaml, FEW_DOCS[:2], extra_files={"train.jsonl": train})
    first = evaluate_task(model, tokenizer, path)
    again = evaluate_task(model, tokenizer, path)
    prompts = [s["prompt"] for s in first.samples]
    assert prompts == [s["prompt"] for s in again.samples]
    rng = random.Random(1234)  # lm-eval's default few-shot seed, one stream in doc order
    for doc, prompt in zip(FEW_DOCS[:2], prompts):
        shots = rng.sample(train, 2)
        assert prompt == "Answer.\n\n" + "".join(f"Q: {s['q']} -> {s['a']}\n##\n" for s in shots) + f"Q: {doc['q']}"
    assert evaluate_task(model, tokenizer, path, num_fewshot=0).samples[0]["prompt"] == "Answer.\n\nQ: q0"


def test_results_are_written_as_json_and_markdown(tmp_path, tokenizer, markov):
    model, _, _ = markov
    results = evaluate(model, tokenizer, [_write_task(tmp_path, MC_YAML, MC_DOCS)])
    json_path, md_path = write_results(results, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["animals"]["metrics"] == {"acc": 0.75, "acc_norm": 0.25}
    assert data["animals"]["settings"]["num_fewshot"] == 0 and data["animals"]["settings"]["split"] == "test"
    assert "| animals | acc | 0 | 0.7500 | 0.2500 |" in md_path.read_text()


def test_mean_stderr_is_the_sample_formula():
    assert mean_stderr([1.0, 0.0]) == pytest.approx(math.sqrt(0.5) / math.sqrt(2))
    assert mean_stderr([1.0]) is None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda y: y.replace('doc_to_text: "Q: {{question}}\\nA:"\n', ""), "lacks required key(s) doc_to_text"),
        (lambda y: y.replace("doc_to_choice: choices\n", ""), "doc_to_choice"),
        (lambda y: y.replace("multiple_choice", "ranking"), "output_type 'ranking' is unknown; accepted"),
        (lambda y: y.replace("test: data.jsonl", "test: missing.jsonl"), "does not exist"),
        (lambda y: y.replace("test_split: test\n", ""), "test_split or validation_split"),
        (lambda y: y.replace("dataset_path: json", "dataset_path: hellaswag"), "local JSON lines only"),
        (lambda y: y + "metric_list:\n  - metric: bleu\n", "not available for multiple_choice"),
    ],
)
def test_bad_task_files_give_clear_errors(tmp_path, edit, message):
    with pytest.raises(MetricError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_task(_write_task(tmp_path, edit(MC_YAML), MC_DOCS))


def test_bad_documents_give_clear_errors(tmp_path, tokenizer, markov):
    model, _, _ = markov
    with pytest.raises(MetricError, match="does not exist"):
        load_task(tmp_path / "nope.yaml")
    path = _write_task(tmp_path, MC_YAML, [{"prompt": "no question field", "choices": ["a"], "label": 0}])
    with pytest.raises(MetricError, match="'question' is undefined"):
        evaluate_task(model, tokenizer, path)
    path = _write_task(tmp_path, MC_YAML, [{"question": "q", "choices": ["a", "b"], "label": 5}])
    with pytest.raises(MetricError, match="outside the 2 choices"):
        evaluate_task(model, tokenizer, path)
    (tmp_path / "data.jsonl").write_text("not json\n")
    with pytest.raises(MetricError, match="one JSON object per line"):
        load_task(tmp_path / "task.yaml")


def test_lm_eval_simple_evaluate_gives_the_same_numbers(tmp_path, tokenizer, markov):
    """The same local tasks run through lm-evaluation-harness with genforge registered as its
    model give the numbers genforge's harness gives."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from genforge.evaluate.lm_eval_model import GenforgeLM

    model, _, _ = markov
    data = tmp_path / "data"
    data.mkdir()
    (data / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (data / "gen.jsonl").write_text(
        json.dumps({"question": "Capital?", "answer": " paris"})
        + "\n"
        + json.dumps({"question": "Capital?", "answer": " london"})
        + "\n"
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    # lm-eval hands data_files to `datasets`, which reads them relative to the working
    # directory; absolute paths serve both harnesses.
    (tasks / "mc.yaml").write_text(MC_YAML.replace("test: data.jsonl", f"test: {data / 'mc.jsonl'}"))
    (tasks / "gen.yaml").write_text(
        f"task: capitals\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: answer\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 8\nmetric_list:\n  - metric: exact_match\n"
    )
    ours = evaluate(model, tokenizer, [tasks / "mc.yaml", tasks / "gen.yaml"])
    theirs = lm_eval.simple_evaluate(
        model=GenforgeLM(model, tokenizer),
        tasks=["animals", "capitals"],
        task_manager=TaskManager(include_path=str(tasks)),
        num_fewshot=0,
        bootstrap_iters=10,
        log_samples=False,
    )["results"]
    for metric in ("acc", "acc_norm"):
        assert theirs["animals"][f"{metric},none"] == pytest.approx(ours["animals"].metrics[metric])
        assert theirs["animals"][f"{metric}_stderr,none"] == pytest.approx(ours["animals"].stderr[metric])
    assert ours["capitals"].metrics["exact_match"] == 0.5
    assert theirs["capitals"]["exact_match,none"] == pytest.approx(0.5)


def test_lm_eval_same_numbers_with_seeded_fewshot(tmp_path, text_model_dir, tokenizer):
    """A context-sensitive model, few-shot examples from a separate split: lm-eval's sampler
    and genforge's draw the same examples, so the log-likelihoods agree."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from genforge.checkpoint import load_model
    from genforge.evaluate.lm_eval_model import GenforgeLM

    model = load_model(text_model_dir)
    words = ["red", "green", "blue", "black", "white", "brown", "pink", "grey"]
    (tmp_path / "test.jsonl").write_text(
        "".join(json.dumps({"q": f"colour {i}", "a": w}) + "\n" for i, w in enumerate(words[:4]))
    )
    (tmp_path / "train.jsonl").write_text(
        "".join(json.dumps({"q": f"shade {i}", "a": w}) + "\n" for i, w in enumerate(words))
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "ll.yaml").write_text(
        f"task: colours\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'test.jsonl'}\n"
        f"    train: {tmp_path / 'train.jsonl'}\ntest_split: test\nfewshot_split: train\n"
        "output_type: loglikelihood\ndoc_to_text: 'Q: {{q}}\\nA:'\ndoc_to_target: a\nnum_fewshot: 3\n"
    )
    ours = evaluate(model, tokenizer, tasks / "ll.yaml")["colours"]
    theirs = lm_eval.simple_evaluate(
        model=GenforgeLM(model, tokenizer),
        tasks=["colours"],
        task_manager=TaskManager(include_path=str(tasks)),
        bootstrap_iters=10,
        log_samples=True,
    )
    their_prompts = [s["arguments"][0][0] for s in theirs["samples"]["colours"]]
    assert their_prompts == [s["prompt"] for s in ours.samples]
    assert theirs["results"]["colours"]["perplexity,none"] == pytest.approx(ours.metrics["perplexity"], rel=1e-5)
    assert theirs["results"]["colours"]["acc,none"] == pytest.approx(ours.metrics["acc"])


def test_lm_eval_same_rolling_perplexities(tmp_path, text_model_dir, tokenizer):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from genforge.checkpoint import load_model
    from genforge.evaluate.lm_eval_model import GenforgeLM

    model = load_model(text_model_dir)
    texts = ["the quick brown fox jumps", "over the lazy dog", "pack my box with five dozen jugs"]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "corpus.yaml").write_text(
        f"task: corpus\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'corpus.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: text\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    ours = evaluate(model, tokenizer, tasks / "corpus.yaml")["corpus"]
    theirs = lm_eval.simple_evaluate(
        model=GenforgeLM(model, tokenizer),
        tasks=["corpus"],
        task_manager=TaskManager(include_path=str(tasks)),
        bootstrap_iters=10,
        log_samples=False,
    )["results"]["corpus"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert theirs[f"{metric},none"] == pytest.approx(ours.metrics[metric], rel=1e-6)
