"""`genforge eval metrics|ppl|harness|judge|ab`, registered by `genforge.cli`.
Each parses its flags, calls `genforge.evaluate` and prints a table or JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..console import console
from ..generate.cli import add_model_flags
from ..ops.hooks import publish_metrics
from ..ops.registry import model_dir_argument
from ..ops.tracking import enable_tracking


def _read_lines(path: str, what: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what} file {path} does not exist") from None
    return text.rstrip("\n").split("\n") if text else []


def cmd_eval_metrics(args) -> int:
    from . import METRICS, bertscore, compute

    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    accepted = [*METRICS, "bertscore"]
    unknown = [n for n in names if n not in accepted]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; accepted: {', '.join(accepted)}")
    predictions = _read_lines(args.pred, "--pred")
    reference_sets = [_read_lines(path, "--ref") for path in args.ref]
    for path, refs in zip(args.ref, reference_sets):
        if len(refs) != len(predictions):
            raise ValueError(
                f"{args.pred} has {len(predictions)} lines but {path} has {len(refs)}; "
                "each reference file needs one line per prediction"
            )
    references = [list(row) for row in zip(*reference_sets)] if reference_sets else None
    report = {}
    plain = [n for n in names if n != "bertscore"]
    for name, result in compute(plain, predictions, references).items():
        report[name] = {"score": result.score, "details": result.details, "settings": result.settings}
    if "bertscore" in names:
        if references is None:
            raise ValueError("bertscore needs --ref")
        result = bertscore(predictions, references)
        report["bertscore"] = {"score": result.score, "details": result.mean, "settings": result.settings}
    print("| metric | score | details |\n|---|---|---|")
    for name, entry in report.items():
        details = ", ".join(f"{k} {v:.4g}" for k, v in entry["details"].items() if isinstance(v, (int, float)))
        print(f"| {name} | {entry['score']:.4f} | {details} |")
    # to a tracker (--track): each score, and its numeric details as METRIC.DETAIL
    publish_metrics(
        {
            f"{name}{'.' + key if key else ''}": value
            for name, entry in report.items()
            for key, value in [("", entry["score"]), *entry["details"].items()]
        }
    )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        console.print(f"[dim]wrote {args.out}[/dim]")
    return 0


def cmd_eval_ppl(args) -> int:
    from ..loading import load_for_inference
    from . import perplexity_of_text

    text = Path(args.text).read_text(encoding="utf-8")
    loaded = load_for_inference(args.model, dtype=args.dtype, device=args.device, adapter=args.adapter)
    result = perplexity_of_text(loaded.model, loaded.tokenizer, text, max_length=args.max_length, stride=args.stride)
    publish_metrics(
        {"perplexity": result.perplexity, "mean_nll": result.mean_nll, "scored_tokens": result.num_scored_tokens}
    )
    print(
        json.dumps(
            {
                "perplexity": result.perplexity,
                "mean_nll": result.mean_nll,
                "scored_tokens": result.num_scored_tokens,
                "windows": result.num_windows,
                **result.settings,
            },
            indent=2,
        )
    )
    return 0


def cmd_eval_harness(args) -> int:
    from ..loading import load_for_inference
    from ..tokenizer import Tokenizer
    from . import evaluate, results_table, write_results
    from .harness import load_task

    if bool(args.model) == bool(args.endpoint):
        raise ValueError(
            "give either --model DIR (run in-process) or --endpoint URL with --served-model and "
            "--tokenizer (an OpenAI-compatible server)"
        )
    tasks = [load_task(path) for path in args.tasks]  # every task file is checked before the model loads
    if args.endpoint:
        from .endpoint import EndpointLanguageModel

        if not args.served_model or not args.tokenizer:
            raise ValueError(
                "--endpoint needs --served-model NAME and --tokenizer DIR (the served model's tokenizer, "
                "to split contexts and continuations into the tokens it scores)"
            )
        model = EndpointLanguageModel(
            args.endpoint,
            args.served_model,
            Tokenizer.from_dir(args.tokenizer),
            api_key=args.api_key,
            max_length=args.max_length,
            concurrency=args.concurrency,
        )
        tokenizer = None
    else:
        loaded = load_for_inference(args.model, dtype=args.dtype, device=args.device)
        model, tokenizer = loaded.model, loaded.tokenizer
    results = evaluate(
        model, tokenizer, tasks, num_fewshot=args.num_fewshot, limit=args.limit, batch_size=args.batch_size
    )
    print(results_table(results))
    publish_metrics(
        {f"{task}.{metric}": value for task, result in results.items() for metric, value in result.metrics.items()}
    )
    if args.out:
        json_path, md_path = write_results(results, args.out)
        console.print(f"[dim]wrote {json_path} and {md_path}[/dim]")
    return 0


def _read_jsonl(path: str, what: str) -> list[dict]:
    from ..jsonl import json_objects

    return [row for _, row in json_objects(_read_lines(path, what), path)]


def cmd_eval_judge(args) -> int:
    from . import Battle, bradley_terry, cohen_kappa, elo_ratings

    if args.answers:
        battles = _judge_answers(args)
    else:
        if not args.battles:
            raise ValueError(
                "give --battles FILE (judged battles), or --answers FILE with --endpoint and "
                "--judge-model to have a model judge them"
            )
        rows = _read_jsonl(args.battles, "--battles")
        missing = [i for i, r in enumerate(rows, 1) if not {"model_a", "model_b", "winner"} <= set(r)]
        if missing or not rows:
            raise ValueError(
                f"{args.battles}: every line needs model_a, model_b and winner (A, B or tie); "
                f"{'no battles' if not rows else f'line {missing[0]} lacks one'}"
            )
        battles = [Battle(r["model_a"], r["model_b"], r["winner"]) for r in rows]
    fit = bradley_terry if args.method == "bradley-terry" else elo_ratings
    ratings = fit(battles, bootstrap=args.bootstrap, seed=args.seed)
    publish_metrics({f"rating.{model}": value for model, value in ratings.ratings.items()})
    print(f"| model | {args.method} rating | {'95% interval' if args.bootstrap else ''} |\n|---|---:|---|")
    for model in ratings.ranking():
        low_high = ratings.intervals.get(model) if ratings.intervals else None
        interval = f"{low_high[0]:.1f} .. {low_high[1]:.1f}" if low_high else ""
        print(f"| {model} | {ratings.ratings[model]:.1f} | {interval} |")
    if args.human:
        human = [r["winner"] for r in _read_jsonl(args.human, "--human")]
        if len(human) != len(battles):
            raise ValueError(f"{args.human} has {len(human)} labels for {len(battles)} battles; give one per line")
        kappa = cohen_kappa([b.winner for b in battles], human)
        print(f"\nagreement with human labels: Cohen's kappa {kappa.score:.3f}")
    return 0


def _judge_answers(args) -> list:
    """Battles from an LLM judge behind an OpenAI-compatible endpoint, both orders per pair."""
    from ..atomic import atomic_write_text
    from . import judge_all
    from .endpoint import endpoint_judge

    if not args.endpoint or not args.judge_model:
        raise ValueError("--answers needs --endpoint URL and --judge-model NAME (the chat model that judges)")
    rows = _read_jsonl(args.answers, "--answers")
    if not rows or not all(isinstance(r.get("question"), str) and isinstance(r.get("answers"), dict) for r in rows):
        raise ValueError(f"{args.answers}: every line needs question (a string) and answers ({{model: answer}})")
    models = list(rows[0]["answers"])
    if any(list(r["answers"]) != models for r in rows):
        raise ValueError(f"{args.answers}: every line must answer with the same models, in the same order: {models}")
    judge = endpoint_judge(args.endpoint, args.judge_model, api_key=args.api_key)
    judged = judge_all(judge, [r["question"] for r in rows], {m: [r["answers"][m] for r in rows] for m in models})
    console.print(
        f"[dim]{len(judged.battles)} battles; both orders agreed on {judged.consistency:.0%} "
        "(the rest count as ties)[/dim]"
    )
    if args.battles:
        lines = [json.dumps({"model_a": b.model_a, "model_b": b.model_b, "winner": b.winner}) for b in judged.battles]
        atomic_write_text(Path(args.battles), "\n".join(lines) + "\n")
        console.print(f"[dim]wrote {args.battles}[/dim]")
    return judged.battles


def cmd_eval_ab(args) -> int:
    from . import bootstrap_difference_ci, sample_size_two_proportions, two_proportion_ztest, welch_t_test

    if args.sample_size:
        p_a, p_b = args.sample_size
        plan = sample_size_two_proportions(p_a, p_b, alpha=args.alpha, power=args.power)
        print(
            json.dumps(
                {
                    "rate_a": p_a,
                    "rate_b": p_b,
                    "alpha": args.alpha,
                    "power": args.power,
                    **{k: v for k, v in vars(plan).items() if isinstance(v, (int, float, str))},
                },
                indent=2,
            )
        )
        return 0
    if not (args.a and args.b):
        raise ValueError("give --a and --b (per-item scores, one number per line), or --sample-size RATE_A RATE_B")
    a, b = (
        [float(x) for x in _read_lines(path, flag) if x.strip()] for path, flag in ((args.a, "--a"), (args.b, "--b"))
    )
    binary = set(a) | set(b) <= {0.0, 1.0}
    if binary:  # pass/fail per item: compare the two rates
        test = two_proportion_ztest(int(sum(a)), len(a), int(sum(b)), len(b))
    else:
        test = welch_t_test(a, b)
    interval = bootstrap_difference_ci(a, b, seed=args.seed)
    publish_metrics(
        {
            "effect_b_minus_a": test.effect,
            "statistic": test.statistic,
            "p_value": test.p_value,
            "n_a": len(a),
            "n_b": len(b),
        }
    )
    print(
        json.dumps(
            {
                "test": test.name,
                "effect_b_minus_a": test.effect,
                "statistic": test.statistic,
                "p_value": test.p_value,
                "significant": test.significant(args.alpha),
                "confidence_interval": test.confidence_interval,
                "bootstrap_interval": [interval.low, interval.high],
                "n_a": len(a),
                "n_b": len(b),
            },
            indent=2,
        )
    )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge eval ...` to the top-level parser."""
    evaluate = sub.add_parser("eval", help="evaluate text or models", description="Evaluation commands.")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")
    metrics = eval_sub.add_parser(
        "metrics",
        help="reference-based metrics over prediction/reference files",
        description="Score predictions (one per line) against references (one file per "
        "reference set, one line per prediction). Prints a Markdown table.",
    )
    metrics.add_argument("--pred", required=True, help="predictions, one per line")
    metrics.add_argument("--ref", action="append", default=[], help="references, one per line (repeatable)")
    metrics.add_argument(
        "--metrics",
        default="bleu,chrf,rouge",
        help="comma-separated: bleu, chrf, rouge, meteor, squad, distinct_n, self_bleu, bertscore",
    )
    metrics.add_argument("--out", default=None, help="also write the full results (settings included) as JSON")
    metrics.set_defaults(func=cmd_eval_metrics)
    enable_tracking(metrics, run_dir_flag=None)
    ppl = eval_sub.add_parser(
        "ppl",
        help="perplexity of a model over a text file",
        description="Strided-window perplexity of a causal model over a text file.",
    )
    add_model_flags(ppl)
    ppl.add_argument("--text", required=True, help="UTF-8 text file")
    ppl.add_argument("--max-length", type=int, default=None, help="window length (default: the model's context)")
    ppl.add_argument("--stride", type=int, default=None, help="window step (default: half the window)")
    ppl.set_defaults(func=cmd_eval_ppl)
    enable_tracking(ppl, run_dir_flag=None)
    harness = eval_sub.add_parser(
        "harness",
        help="run lm-evaluation-harness-style YAML tasks on a model",
        description="Run tasks written in lm-evaluation-harness's YAML conventions over "
        "local JSONL data; prints a Markdown table (see docs/evaluation.md).",
    )
    harness.add_argument(
        "--model",
        default=None,
        type=model_dir_argument,
        help="Hugging Face model directory (or registry:NAME@ALIAS), run in-process",
    )
    harness.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16 or auto")
    harness.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    remote = harness.add_argument_group("a model behind an OpenAI-compatible server (genforge serve, vLLM, ...)")
    remote.add_argument("--endpoint", default=None, help="base URL, e.g. http://localhost:8000/v1")
    remote.add_argument("--served-model", default=None, help="the model name the server knows")
    remote.add_argument("--tokenizer", default=None, help="directory with the served model's tokenizer.json")
    remote.add_argument("--api-key", default=None, help="Bearer key (default: none)")
    remote.add_argument("--max-length", type=int, default=2048, help="the served model's context length")
    remote.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    harness.add_argument("--tasks", nargs="+", required=True, help="task YAML files")
    harness.add_argument("--num-fewshot", type=int, default=None, help="override each task's num_fewshot")
    harness.add_argument("--limit", type=int, default=None, help="evaluate only the first N docs of each task")
    harness.add_argument("--batch-size", type=int, default=8, help="contexts scored per forward pass")
    harness.add_argument("--out", default=None, help="directory for results.json and results.md")
    harness.set_defaults(func=cmd_eval_harness)
    enable_tracking(harness, run_dir_flag=None)
    judge = eval_sub.add_parser(
        "judge",
        help="ratings from pairwise judgments",
        description="Aggregate pairwise battles (JSONL lines {model_a, model_b, winner: "
        "A|B|tie}) into Bradley-Terry or Elo ratings, optionally with bootstrap "
        "intervals and agreement with human labels; or first have an LLM judge "
        "behind an OpenAI-compatible endpoint produce the battles (--answers).",
    )
    judge.add_argument(
        "--battles", default=None, help="JSONL battles to rate (with --answers: where to write the judged battles)"
    )
    judge.add_argument(
        "--answers",
        default=None,
        help="JSONL lines {question, answers: {model: answer}} for an LLM judge to compare pairwise, "
        "in both orders (needs --endpoint and --judge-model)",
    )
    judge.add_argument(
        "--endpoint", default=None, help="OpenAI-compatible base URL of the judge, e.g. http://localhost:8000/v1"
    )
    judge.add_argument("--judge-model", default=None, help="the judge's model name on that server")
    judge.add_argument("--api-key", default=None, help="Bearer key for the endpoint")
    judge.add_argument("--method", choices=("bradley-terry", "elo"), default="bradley-terry")
    judge.add_argument("--bootstrap", type=int, default=0, help="bootstrap rounds for 95%% intervals (0: none)")
    judge.add_argument("--seed", type=int, default=0)
    judge.add_argument(
        "--human", default=None, help="JSONL with a human 'winner' per battle, same order: Cohen's kappa"
    )
    judge.set_defaults(func=cmd_eval_judge)
    enable_tracking(judge, run_dir_flag=None)
    ab = eval_sub.add_parser(
        "ab",
        help="A/B test two systems' per-item scores",
        description="Compare per-item scores of system A and B (one number per line). 0/1 scores "
        "get a two-proportion z-test, others Welch's t-test; both get a bootstrap "
        "interval for B - A. --sample-size plans how many items a test needs.",
    )
    ab.add_argument("--a", default=None, help="scores of system A")
    ab.add_argument("--b", default=None, help="scores of system B")
    ab.add_argument("--alpha", type=float, default=0.05, help="significance level")
    ab.add_argument("--power", type=float, default=0.8, help="power, for --sample-size")
    ab.add_argument(
        "--sample-size",
        type=float,
        nargs=2,
        metavar=("RATE_A", "RATE_B"),
        default=None,
        help="items per arm to tell these two pass rates apart",
    )
    ab.add_argument("--seed", type=int, default=0)
    ab.set_defaults(func=cmd_eval_ab)
    enable_tracking(ab, run_dir_flag=None)
