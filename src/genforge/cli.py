"""The `genforge` command: a thin view over the library.

Each subcommand parses its flags, calls one library function and prints what happened.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from rich.console import Console

console = Console(stderr=True, highlight=False)


# Sampling flags that fall back to the checkpoint's generation_config.json when not given.
_FROM_GENERATION_CONFIG = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty",
                           "no_repeat_ngram_size")


def _add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "sampling",
        "Unset flags take the model's generation_config.json values (do_sample false there means greedy), "
        "else plain sampling at temperature 1 with every filter off.",
    )
    group.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    group.add_argument("--min-new-tokens", type=int, default=0, help="keep end-of-sequence out until this many tokens")
    group.add_argument("--temperature", type=float, help="softmax temperature; 0 is greedy decoding")
    group.add_argument("--top-k", type=int, help="keep the k most likely tokens (0: off)")
    group.add_argument("--top-p", type=float, help="nucleus sampling: smallest set with this mass (1: off)")
    group.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability (0: off)")
    group.add_argument("--typical-p", type=float, help="locally typical sampling mass (1: off)")
    group.add_argument("--repetition-penalty", type=float, help="CTRL penalty on seen tokens (1: off)")
    group.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI presence penalty, -2..2")
    group.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI frequency penalty, -2..2")
    group.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram of this size")
    group.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                       help="add BIAS to token ID's logit (repeatable; -inf bans it)")
    group.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    group.add_argument("--stop-token-id", action="append", type=int, default=[], metavar="ID",
                       help="stop at this token id (repeatable)")
    group.add_argument("--seed", type=int, default=None, help="random seed, for reproducible samples")


def _sampling_params(args, generation_config: dict):
    from .generate.sampling import SamplingParams

    bias = {}
    for item in args.logit_bias:
        token, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--logit-bias takes ID=BIAS, got {item!r}")
        bias[int(token)] = float(value)
    chosen = {}
    for name in _FROM_GENERATION_CONFIG:
        value = getattr(args, name)
        if value is None and generation_config.get(name) is not None:
            value = generation_config[name]
        if value is not None:
            chosen[name] = value
    if args.temperature is None and generation_config.get("do_sample") is False:
        chosen["temperature"] = 0.0
    return SamplingParams(
        **chosen, presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        logit_bias=bias or None, min_new_tokens=args.min_new_tokens, max_new_tokens=args.max_new_tokens,
        stop=args.stop, stop_token_ids=args.stop_token_id, seed=args.seed,
    )


def _load(args):
    from .checkpoint import load_model
    from .inference import pack_for_cpu_inference
    from .tokenizer import Tokenizer

    with console.status(f"loading {args.model}"):
        model = pack_for_cpu_inference(load_model(args.model, dtype=args.dtype, device=args.device))
        tokenizer = Tokenizer.from_dir(args.model)
    return model, tokenizer


STRATEGIES = ("sample", "beam", "diverse-beam", "contrastive", "contrastive-decoding", "speculative", "prompt-lookup")


def _check_strategy_flags(args) -> None:
    """Refuse flag combinations that would be silently ignored, before loading anything."""
    if args.strategy == "speculative" and not args.draft:
        raise ValueError("--strategy speculative needs --draft DIR, a smaller model with the same vocabulary")
    if (args.draft or args.draft_confidence) and args.strategy != "speculative":
        raise ValueError("--draft and --draft-confidence are used only by --strategy speculative")
    if args.stop and args.strategy not in ("sample", "beam", "diverse-beam", "speculative", "prompt-lookup"):
        raise ValueError(f"--stop is not supported by --strategy {args.strategy}; use --stop-token-id")
    if args.do_sample and args.strategy != "beam":
        raise ValueError("--do-sample (beam sampling) is for --strategy beam; --strategy sample always samples")
    if args.strategy in ("speculative", "prompt-lookup") and len(args.prompt) > 1:
        raise ValueError(f"--strategy {args.strategy} decodes one prompt at a time; pass a single --prompt")
    if args.num_beam_groups > 1 and args.strategy != "diverse-beam":
        raise ValueError("--num-beam-groups is for --strategy diverse-beam")
    if args.strategy == "contrastive-decoding" and not args.amateur:
        raise ValueError("--strategy contrastive-decoding needs --amateur DIR, a weaker model with the same vocabulary")
    if args.amateur and args.strategy != "contrastive-decoding":
        raise ValueError("--amateur is used only by --strategy contrastive-decoding")
    if args.watermark is not None and args.strategy != "sample":
        raise ValueError("--watermark applies to --strategy sample")
    given = [flag for flag, value in (("--json-schema", args.json_schema), ("--regex", args.regex),
                                      ("--choices", args.choices)) if value]
    if len(given) > 1:
        raise ValueError(f"use one output constraint at a time, got {' and '.join(given)}")
    if given and args.strategy != "sample":
        raise ValueError(f"{given[0]} applies to --strategy sample")
    if args.json_schema and not Path(args.json_schema).is_file():
        raise ValueError(f"--json-schema {args.json_schema} is not a file")


def cmd_generate(args) -> int:
    from .checkpoint import read_generation_config
    from .generate.generator import continuation_text, only_text_tokens
    from .generate.request import end_of_sequence_ids

    generation_config = read_generation_config(args.model)
    params = _sampling_params(args, generation_config)  # validate before loading the weights
    _check_strategy_flags(args)
    model, tokenizer = _load(args)
    # Llama-3 instruct models, for one, end turns with an id only generation_config lists.
    eos = sorted(end_of_sequence_ids(model.config, tokenizer, generation_config.get("eos_token_id")))
    texts = args.prompt
    if args.chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    prompts = [tokenizer.encode(t, add_special_tokens=not args.chat) for t in texts]
    if args.strategy == "sample":
        extra = _constraints(args, tokenizer, eos)
        if args.watermark is not None:
            from .generate.watermark import Watermark

            extra.append(Watermark(key=args.watermark, gamma=args.watermark_gamma, delta=args.watermark_delta))
        return _stream_samples(args, model, tokenizer, prompts, params, eos, extra)
    params = only_text_tokens(params, model.config.vocab_size, tokenizer)
    rows = _run_strategy(args, model, tokenizer, prompts, params, eos)  # (prompt index, token ids, extra fields)
    for index, token_ids, extra in rows:
        text = extra.pop("text", None)
        if text is None:
            text = continuation_text(tokenizer, prompts[index], token_ids)
        if len(rows) == 1:
            print(text)
        else:
            print(json.dumps({"prompt": args.prompt[index], "completion": text, **extra}, ensure_ascii=False))
    return 0


def _stream_samples(args, model, tokenizer, prompts, params, eos, extra_processors) -> int:
    from .generate.generator import stream

    outputs = [""] * len(prompts)
    reasons = [None] * len(prompts)
    for event in stream(model, prompts, params, tokenizer=tokenizer, eos_token_ids=eos,
                        extra_processors=extra_processors):
        if len(prompts) == 1:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        outputs[event.row] += event.text
        reasons[event.row] = event.finish_reason or reasons[event.row]
    if len(prompts) == 1:
        sys.stdout.write("\n")
    else:
        for prompt, out in zip(args.prompt, outputs):
            print(json.dumps({"prompt": prompt, "completion": out}, ensure_ascii=False))
    console.print(f"[dim]finish reasons: {', '.join(str(r) for r in reasons)}[/dim]")
    return 0


def _run_strategy(args, model, tokenizer, prompts, params, eos) -> list[tuple[int, list[int], dict]]:
    if args.strategy in ("beam", "diverse-beam"):
        from .generate.beam import beam_search
        from .generate.processors import build_processors
        from .generate.sampling import make_generator

        # Beam search ranks whole sequences by log-probability; only the penalties and bans
        # of the processors apply, unless beam sampling draws the candidates (then the
        # temperature and truncation warpers shape what it draws from, as in transformers).
        sampled = args.do_sample and not params.greedy
        processors = build_processors(params if sampled else _deterministic(params), eos,
                                      vocab_size=model.config.vocab_size)
        beams = beam_search(
            model, prompts, num_beams=args.num_beams, max_new_tokens=params.max_new_tokens,
            length_penalty=args.length_penalty, early_stopping=args.early_stopping,
            num_return_sequences=args.num_return_sequences, eos_token_ids=eos, processors=processors,
            num_beam_groups=args.num_beam_groups if args.strategy == "diverse-beam" else 1,
            diversity_penalty=args.diversity_penalty if args.strategy == "diverse-beam" else 0.0,
            do_sample=sampled, generator=make_generator(params.seed) if sampled else None,
            stop_strings=params.stop, tokenizer=tokenizer,
        )
        return [(i, h.token_ids, {"score": round(h.score, 6), "finish_reason": h.finish_reason, "text": h.text})
                for i, hypotheses in enumerate(beams) for h in hypotheses]
    if args.strategy in ("contrastive", "contrastive-decoding"):
        from .generate import contrastive
        from .generate.processors import build_processors

        # Only the penalties and bans of the processors apply: these strategies choose by score.
        bans = build_processors(_deterministic(params), eos, vocab_size=model.config.vocab_size)
        if args.strategy == "contrastive":
            done = contrastive.contrastive_search(model, prompts, args.penalty_alpha, params.top_k or 4,
                                                  params.max_new_tokens, eos_token_ids=eos, processors=bans)
        else:
            amateur = _load_model_only(args, args.amateur)
            done = contrastive.contrastive_decoding(model, amateur, prompts, alpha=args.plausibility_alpha,
                                                    max_new_tokens=params.max_new_tokens,
                                                    temperature=params.temperature, seed=params.seed,
                                                    eos_token_ids=eos, processors=bans)
        return [(i, c.token_ids, {"finish_reason": c.finish_reason}) for i, c in enumerate(done)]
    from .generate.speculative import prompt_lookup_generate, speculative_generate

    if args.strategy == "speculative":
        draft = _load_model_only(args, args.draft)
        done = speculative_generate(model, draft, prompts[0], params, num_draft_tokens=args.num_draft_tokens,
                                    draft_confidence=args.draft_confidence, eos_token_ids=eos, tokenizer=tokenizer)
    else:
        done = prompt_lookup_generate(model, prompts[0], params, num_draft_tokens=args.num_draft_tokens,
                                      eos_token_ids=eos, tokenizer=tokenizer)
    stats = done.stats
    console.print(f"[dim]{stats.generated} tokens in {stats.target_forwards} target passes; acceptance rate "
                  f"{stats.acceptance_rate:.2f}, {stats.tokens_per_target_forward:.2f} tokens per target pass[/dim]")
    return [(0, done.token_ids, {"finish_reason": done.finish_reason, "text": done.text})]


def _constraints(args, tokenizer, eos) -> list:
    from .generate import constrained

    if args.json_schema:
        return [constrained.JsonSchemaConstraint(Path(args.json_schema).read_text(), tokenizer, eos_token_ids=eos)]
    if args.regex:
        return [constrained.RegexConstraint(args.regex, tokenizer, eos_token_ids=eos)]
    if args.choices:
        return [constrained.ChoiceConstraint(args.choices, tokenizer, eos_token_ids=eos)]
    return []


def _load_model_only(args, directory):
    from .checkpoint import load_model
    from .inference import pack_for_cpu_inference

    return pack_for_cpu_inference(load_model(directory, dtype=args.dtype, device=args.device))


def _deterministic(params):
    import dataclasses

    return dataclasses.replace(params, temperature=0.0)


def cmd_chat(args) -> int:
    from .checkpoint import read_generation_config
    from .generate.generator import stream
    from .generate.request import end_of_sequence_ids

    generation_config = read_generation_config(args.model)
    params = _sampling_params(args, generation_config)
    model, tokenizer = _load(args)
    # Llama-3 instruct models, for one, end turns with an id only generation_config lists.
    eos = sorted(end_of_sequence_ids(model.config, tokenizer, generation_config.get("eos_token_id")))
    if tokenizer.chat_template is None:
        raise ValueError(f"{args.model} has no chat template; use `genforge generate` for plain completion")
    history = [{"role": "system", "content": args.system}] if args.system else []
    console.print(f"[dim]chatting with {args.model} — /reset clears the history, /exit or Ctrl-D quits[/dim]")
    while True:
        try:
            user = input("you> ")
        except EOFError:
            break
        if user.strip() in ("/exit", "/quit"):
            break
        if user.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": user})
        prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        sys.stdout.write("assistant> ")
        reply = ""
        for event in stream(model, [prompt], params, tokenizer=tokenizer, eos_token_ids=eos):
            reply += event.text
            sys.stdout.write(event.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": reply})
    return 0


def cmd_convert(args) -> int:
    from .checkpoint import load_model, save_model
    from .tokenizer import Tokenizer

    model = load_model(args.model, dtype=args.dtype)
    tokenizer = Tokenizer.from_dir(args.model) if (Path(args.model) / "tokenizer.json").exists() else None
    out = save_model(model, args.out, tokenizer=tokenizer, max_shard_bytes=int(args.max_shard_mb * 2**20))
    console.print(f"wrote {model.config.family} model ({model.config.num_parameters() / 1e6:.1f}M parameters, "
                  f"{model.dtype}) to {out}")
    return 0


def cmd_quickstart(args) -> int:
    from .quickstart import run

    run(Path(args.out), console=Console(highlight=False), fast=True if args.fast else None)
    return 0


def _read_lines(path: str, what: str) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what} file {path} does not exist") from None
    return text.rstrip("\n").split("\n") if text else []


def cmd_eval_metrics(args) -> int:
    from .evaluate import METRICS, bertscore, compute

    names = [n.strip() for n in args.metrics.split(",") if n.strip()]
    accepted = [*METRICS, "bertscore"]
    unknown = [n for n in names if n not in accepted]
    if unknown or not names:
        raise ValueError(f"unknown metric(s) {', '.join(unknown) or '(none given)'}; accepted: {', '.join(accepted)}")
    predictions = _read_lines(args.pred, "--pred")
    reference_sets = [_read_lines(path, "--ref") for path in args.ref]
    for path, refs in zip(args.ref, reference_sets):
        if len(refs) != len(predictions):
            raise ValueError(f"{args.pred} has {len(predictions)} lines but {path} has {len(refs)}; "
                             "each reference file needs one line per prediction")
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
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
        console.print(f"[dim]wrote {args.out}[/dim]")
    return 0


def cmd_eval_ppl(args) -> int:
    from .checkpoint import load_model
    from .evaluate import perplexity_of_text
    from .tokenizer import Tokenizer

    text = Path(args.text).read_text(encoding="utf-8")
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tokenizer = Tokenizer.from_dir(args.model)
    result = perplexity_of_text(model, tokenizer, text, max_length=args.max_length, stride=args.stride)
    print(json.dumps({"perplexity": result.perplexity, "mean_nll": result.mean_nll,
                      "scored_tokens": result.num_scored_tokens, "windows": result.num_windows,
                      **result.settings}, indent=2))
    return 0


def cmd_watermark_detect(args) -> int:
    from .checkpoint import read_config
    from .generate.watermark import detect_watermark
    from .tokenizer import Tokenizer

    text = Path(args.text).read_text(encoding="utf-8") if args.text else sys.stdin.read()
    vocab_size = read_config(args.model).vocab_size
    ids = Tokenizer.from_dir(args.model).encode(text, add_special_tokens=False)
    result = detect_watermark(ids, vocab_size, key=args.key, gamma=args.gamma, z_threshold=args.z_threshold)
    print(json.dumps({"watermarked": result.is_watermarked, "z_score": round(result.z_score, 3),
                      "p_value": result.p_value, "green": result.num_green, "scored": result.num_scored,
                      "green_fraction": round(result.green_fraction, 4)}, indent=2))
    return 0


def cmd_eval_harness(args) -> int:
    from .checkpoint import load_model
    from .evaluate import evaluate, results_table, write_results
    from .evaluate.harness import load_task
    from .inference import pack_for_cpu_inference
    from .tokenizer import Tokenizer

    if bool(args.model) == bool(args.endpoint):
        raise ValueError("give either --model DIR (run in-process) or --endpoint URL with --served-model and "
                         "--tokenizer (an OpenAI-compatible server)")
    tasks = [load_task(path) for path in args.tasks]  # every task file is checked before the model loads
    if args.endpoint:
        from .evaluate.endpoint import EndpointLanguageModel

        if not args.served_model or not args.tokenizer:
            raise ValueError("--endpoint needs --served-model NAME and --tokenizer DIR (the served model's tokenizer, "
                             "to split contexts and continuations into the tokens it scores)")
        model = EndpointLanguageModel(args.endpoint, args.served_model, Tokenizer.from_dir(args.tokenizer),
                                      api_key=args.api_key, max_length=args.max_length, concurrency=args.concurrency)
        tokenizer = None
    else:
        model = pack_for_cpu_inference(load_model(args.model, dtype=args.dtype, device=args.device))
        tokenizer = Tokenizer.from_dir(args.model)
    results = evaluate(model, tokenizer, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                       batch_size=args.batch_size)
    print(results_table(results))
    if args.out:
        json_path, md_path = write_results(results, args.out)
        console.print(f"[dim]wrote {json_path} and {md_path}[/dim]")
    return 0


def _read_jsonl(path: str, what: str) -> list[dict]:
    from .jsonl import json_objects

    return [row for _, row in json_objects(_read_lines(path, what), path)]


def cmd_eval_judge(args) -> int:
    from .evaluate import Battle, bradley_terry, cohen_kappa, elo_ratings

    if args.answers:
        battles = _judge_answers(args)
    else:
        if not args.battles:
            raise ValueError("give --battles FILE (judged battles), or --answers FILE with --endpoint and "
                             "--judge-model to have a model judge them")
        rows = _read_jsonl(args.battles, "--battles")
        missing = [i for i, r in enumerate(rows, 1) if not {"model_a", "model_b", "winner"} <= set(r)]
        if missing or not rows:
            raise ValueError(f"{args.battles}: every line needs model_a, model_b and winner (A, B or tie); "
                             f"{'no battles' if not rows else f'line {missing[0]} lacks one'}")
        battles = [Battle(r["model_a"], r["model_b"], r["winner"]) for r in rows]
    fit = bradley_terry if args.method == "bradley-terry" else elo_ratings
    ratings = fit(battles, bootstrap=args.bootstrap, seed=args.seed)
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
    from .atomic import atomic_write_text
    from .evaluate import judge_all
    from .evaluate.endpoint import endpoint_judge

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
    console.print(f"[dim]{len(judged.battles)} battles; both orders agreed on {judged.consistency:.0%} "
                  "(the rest count as ties)[/dim]")
    if args.battles:
        lines = [json.dumps({"model_a": b.model_a, "model_b": b.model_b, "winner": b.winner}) for b in judged.battles]
        atomic_write_text(Path(args.battles), "\n".join(lines) + "\n")
        console.print(f"[dim]wrote {args.battles}[/dim]")
    return judged.battles


def cmd_eval_ab(args) -> int:
    from .evaluate import bootstrap_difference_ci, sample_size_two_proportions, two_proportion_ztest, welch_t_test

    if args.sample_size:
        p_a, p_b = args.sample_size
        plan = sample_size_two_proportions(p_a, p_b, alpha=args.alpha, power=args.power)
        print(json.dumps({"rate_a": p_a, "rate_b": p_b, "alpha": args.alpha, "power": args.power,
                          **{k: v for k, v in vars(plan).items() if isinstance(v, (int, float, str))}}, indent=2))
        return 0
    if not (args.a and args.b):
        raise ValueError("give --a and --b (per-item scores, one number per line), or --sample-size RATE_A RATE_B")
    a, b = ([float(x) for x in _read_lines(path, flag) if x.strip()] for path, flag in ((args.a, "--a"), (args.b, "--b")))
    binary = set(a) | set(b) <= {0.0, 1.0}
    if binary:  # pass/fail per item: compare the two rates
        test = two_proportion_ztest(int(sum(a)), len(a), int(sum(b)), len(b))
    else:
        test = welch_t_test(a, b)
    interval = bootstrap_difference_ci(a, b, seed=args.seed)
    print(json.dumps({"test": test.name, "effect_b_minus_a": test.effect, "statistic": test.statistic,
                      "p_value": test.p_value, "significant": test.significant(args.alpha),
                      "confidence_interval": test.confidence_interval,
                      "bootstrap_interval": [interval.low, interval.high], "n_a": len(a), "n_b": len(b)}, indent=2))
    return 0


def _training_data(args, tokenizer, seq_len_default: int = 256):
    """(train, val) TokenDatasets from --data (prepared shards) or --text (tokenized here)."""
    from .train import TokenDataset
    from .train.data import load_prepared

    if (args.text is None) == (args.data is None):
        raise ValueError("give exactly one of --text FILE (tokenized here) or --data DIR (from `genforge data prepare`)")
    if args.data is not None:
        return load_prepared(args.data, seq_len=args.seq_len)
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if tokenizer is None:
        raise ValueError("--text needs a tokenizer: pass --tokenizer DIR or a --model directory with tokenizer.json")
    ids = tokenizer.encode(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=False)
    split = int(len(ids) * (1 - args.val_fraction))
    seq_len = args.seq_len or seq_len_default
    return TokenDataset(ids[:split], seq_len), TokenDataset(ids[split:], seq_len)


def _optional_tokenizer(args):
    from .tokenizer import Tokenizer

    directory = Path(args.tokenizer or args.model)
    if args.tokenizer is None and not (directory / "tokenizer.json").exists():
        return None  # --data training needs no tokenizer; the export then carries none
    return Tokenizer.from_dir(directory)


def cmd_pretrain(args) -> int:
    import torch

    from .checkpoint import load_model, read_config
    from .model import Transformer
    from .train import TrainConfig, Trainer
    from .train.distributed import destroy_distributed, init_distributed

    config = TrainConfig(out_dir=args.out, max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         lr=args.lr, warmup_steps=args.warmup, eval_every=args.eval_every, save_every=args.save_every,
                         gradient_checkpointing=args.gradient_checkpointing, peak_flops=args.peak_flops,
                         seed=args.seed, device=args.device, precision=args.precision, fsdp=args.fsdp,
                         mlm_probability=args.mlm_probability)
    config.validate()  # before the text is tokenized and the model built
    # Under torchrun: join the process group (gloo on CPU, NCCL on CUDA) and take this rank's GPU.
    context, config.device = init_distributed(args.device)
    try:
        tokenizer = _optional_tokenizer(args)
        train_data, val_data = _training_data(args, tokenizer)
        torch.manual_seed(args.seed)  # the same initial weights on every rank and every run
        model = load_model(args.model) if args.init_weights else Transformer(read_config(args.model))
        result = Trainer(model, train_data, config, val_data=val_data, tokenizer=tokenizer,
                         distributed=context).train(resume=args.resume)
    finally:
        destroy_distributed()
    if context.is_main:
        final = result.evals[-1] if result.evals else {}
        console.print(f"trained to step {result.step}; val loss {final.get('val_loss', float('nan')):.4f}, "
                      f"perplexity {final.get('val_ppl', float('nan')):.2f}; model in {result.export_dir}")
    return 0


def cmd_size_chinchilla(args) -> int:
    from .train.sizing import chinchilla_optimal, training_flops

    flops = args.flops
    if flops is None:
        if args.parameters is None or args.tokens is None:
            raise ValueError("give --flops, or --parameters and --tokens to compute the budget from")
        flops = training_flops(args.parameters, args.tokens)
    methods = ("fit", "rule") if args.method == "both" else (args.method,)
    plans = [chinchilla_optimal(flops, m, args.tokens_per_parameter).as_dict() for m in methods]
    print(json.dumps({"flops": flops, "plans": plans}, indent=2))
    return 0


def cmd_size_fit(args) -> int:
    from .train.sizing import fit_power_law, plot_power_law, points_from_runs, read_points

    if bool(args.points) == bool(args.runs):
        raise ValueError("give --points CSV (columns compute,loss) or --runs DIR [DIR ...] (finished pretrain runs)")
    compute, loss = read_points(args.points) if args.points else points_from_runs(args.runs)
    fit = fit_power_law(compute, loss, irreducible=args.irreducible)
    out = {"fit": fit.as_dict(), "points": [{"compute": c, "loss": v} for c, v in zip(compute, loss)]}
    if args.extrapolate:
        out["predicted_loss"] = {str(c): float(fit.predict(c)) for c in args.extrapolate}
    if args.plot:
        out["plot"] = str(plot_power_law(fit, compute, loss, args.plot, max(args.extrapolate or [0]) or None))
    print(json.dumps(out, indent=2))
    return 0


def cmd_size_noise_scale(args) -> int:
    from .checkpoint import load_model
    from .train.sizing import language_model_noise_scale

    tokenizer = _optional_tokenizer(args)
    train_data, _ = _training_data(args, tokenizer, seq_len_default=128)
    model = load_model(args.model, device=args.device)
    estimate = language_model_noise_scale(model, train_data, args.small, args.big, args.trials, args.seed, args.device)
    out = estimate.as_dict() | {"seq_len": train_data.seq_len,
                                "critical_batch_tokens": estimate.critical_batch * train_data.seq_len}
    print(json.dumps(out, indent=2))
    return 0


def _early_stopping(value: str):
    table = {"true": True, "false": False, "never": "never"}
    if value.lower() not in table:
        raise argparse.ArgumentTypeError(f"expected true, false or never, got {value!r}")
    return table[value.lower()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genforge",
        description="genforge: the generative-AI stack in one codebase: train, load Hugging Face checkpoints, "
                    "decode, serve (OpenAI-compatible), retrieve with citations and evaluate. Each command has --help.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    quick = sub.add_parser("quickstart", help="the main job on embedded data: search, generate, train a model from "
                                              "text in ~3 minutes",
                           description="Three steps, no download: (1) embed stdlib module docs with all-MiniLM-L6-v2 "
                                       "through genforge's BERT and search them; (2) build, export, reload and stream "
                                       "from a small Llama-style model; (3) on the Python standard library's source, "
                                       "train a BPE tokenizer, prepare and dedup shards, pretrain a small Llama for "
                                       "about 3 minutes, report validation perplexity against a unigram baseline, "
                                       "save the loss curve and print samples from three decoding settings.")
    quick.add_argument("--out", default="genforge-out/quickstart", help="where the models, shards and plots go")
    quick.add_argument("--fast", action="store_true",
                       help="a tiny, seconds-long pretraining step (also GENFORGE_QUICKSTART_FAST=1)")
    quick.set_defaults(func=cmd_quickstart)

    def model_flags(p):
        p.add_argument("--model", required=True, help="Hugging Face model directory (config.json, *.safetensors, "
                                                      "tokenizer.json)")
        p.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16 or auto (checkpoint's)")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")

    gen = sub.add_parser("generate", help="complete one or more prompts", description="Generate text from prompts; a "
                         "single prompt streams to stdout, several print one JSON line each.")
    model_flags(gen)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: a batch)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn with the chat template")
    _add_sampling_flags(gen)
    strategy = gen.add_argument_group("decoding strategy")
    strategy.add_argument("--strategy", choices=STRATEGIES, default="sample",
                          help="sample: token by token with the sampling flags (temperature 0 is greedy), streamed; "
                               "beam / diverse-beam: beam search; speculative: a --draft model proposes tokens the "
                               "target verifies (same output distribution); prompt-lookup: drafts copied from the "
                               "prompt")
    strategy.add_argument("--num-beams", type=int, default=4, help="beams (beam strategies)")
    strategy.add_argument("--length-penalty", type=float, default=1.0,
                          help="beam score = log-prob / length**penalty; > 0 favours longer outputs")
    strategy.add_argument("--early-stopping", default=False, type=_early_stopping,
                          help="beam: true (stop at num_beams finished), false (heuristic) or never")
    strategy.add_argument("--num-return-sequences", type=int, default=1, help="beam hypotheses to print per prompt")
    strategy.add_argument("--do-sample", action="store_true",
                          help="beam: beam sampling, drawing candidates through --temperature/--top-k/--top-p")
    strategy.add_argument("--num-beam-groups", type=int, default=1, help="diverse-beam: groups of beams")
    strategy.add_argument("--diversity-penalty", type=float, default=0.5,
                          help="diverse-beam: Hamming penalty on tokens chosen by earlier groups")
    strategy.add_argument("--penalty-alpha", type=float, default=0.6,
                          help="contrastive: weight of the degeneration penalty (0 is greedy); uses --top-k (default 4)")
    strategy.add_argument("--amateur", default=None, help="contrastive-decoding: the amateur model directory")
    strategy.add_argument("--plausibility-alpha", type=float, default=0.1,
                          help="contrastive-decoding: keep tokens with p_expert >= alpha x the top probability")
    strategy.add_argument("--draft", default=None, help="speculative: draft model directory")
    strategy.add_argument("--num-draft-tokens", type=int, default=4, help="speculative / prompt-lookup: k per round")
    strategy.add_argument("--draft-confidence", type=float, default=0.0,
                          help="speculative: stop a round's drafting after a draft token the draft model gives less "
                               "than this probability (dynamic draft length; 0 always drafts k; speed only)")
    shape = gen.add_argument_group("constrained output (through llguidance; needs a byte-level BPE tokenizer)")
    shape.add_argument("--json-schema", default=None, metavar="FILE", help="output is JSON valid under this schema")
    shape.add_argument("--regex", default=None, help="output matches this regular expression in full")
    shape.add_argument("--choices", nargs="+", default=None, help="output is exactly one of these strings")
    mark = gen.add_argument_group("watermark (Kirchenbauer et al. 2023)")
    mark.add_argument("--watermark", type=int, default=None, metavar="KEY",
                      help="bias a keyed green list of tokens; detect later with `genforge watermark detect`")
    mark.add_argument("--watermark-gamma", type=float, default=0.25, help="fraction of the vocabulary that is green")
    mark.add_argument("--watermark-delta", type=float, default=2.0, help="logit bias added to green tokens")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with streamed replies",
                          description="Chat in the terminal; turns are rendered with the model's chat template.")
    model_flags(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    _add_sampling_flags(chat)
    chat.set_defaults(func=cmd_chat)

    convert = sub.add_parser("convert", help="load a model and export it as a Hugging Face directory",
                             description="Round-trip a checkpoint through genforge: change dtype or re-shard.")
    convert.add_argument("--model", required=True, help="source Hugging Face model directory")
    convert.add_argument("--out", required=True, help="target directory (replaced atomically)")
    convert.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (keep the checkpoint's)")
    convert.add_argument("--max-shard-mb", type=float, default=5120, help="split weights into shards of this size")
    convert.set_defaults(func=cmd_convert)
    pretrain = sub.add_parser("pretrain", help="pretrain a model on text or prepared shards (torchrun for several)",
                              description="Causal-LM training for decoders, masked-LM for a BERT encoder with a "
                                          "masked-LM head, with AdamW, warmup + cosine decay, clipping, "
                                          "accumulation, periodic evaluation and atomic checkpoints; --resume "
                                          "continues exactly. Writes metrics.jsonl, loss_curve.png and the final "
                                          "model (a Hugging Face directory) under --out. Under torchrun "
                                          "(torchrun --nproc_per_node N -m genforge.cli pretrain ...) it trains "
                                          "data-parallel: DDP, or FSDP with --fsdp. See docs/training.md.")
    pretrain.add_argument("--model", required=True,
                          help="directory with config.json: the architecture (its weights too with --init-weights)")
    pretrain.add_argument("--init-weights", action="store_true", help="start from the directory's weights")
    pretrain.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    pretrain.add_argument("--text", default=None, help="UTF-8 training text; the last --val-fraction is held out")
    pretrain.add_argument("--data", default=None, help="a `genforge data prepare` directory (memory-mapped shards)")
    pretrain.add_argument("--out", required=True, help="run directory (checkpoints, metrics, plot, model)")
    pretrain.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    pretrain.add_argument("--device", default="cpu")
    for flag, kind, default, text in (
        ("--steps", int, 1000, "optimizer steps"),
        ("--seq-len", int, None, "tokens per sequence (default: 256 with --text, the prepared one with --data)"),
        ("--batch-size", int, 8, "sequences per micro-batch, over all processes under torchrun"), ("--grad-accum", int, 1, "micro-batches per step"),
        ("--lr", float, 3e-4, "peak learning rate"), ("--warmup", int, 100, "linear warmup steps"),
        ("--eval-every", int, 100, "steps between evaluations (0: at the end)"),
        ("--save-every", int, 100, "steps between checkpoints (0: at the end)"),
        ("--val-fraction", float, 0.05, "share of the text held out for validation"), ("--seed", int, 0, "seed"),
        ("--peak-flops", float, None, "the device's peak FLOP/s, to show MFU"),
    ):
        pretrain.add_argument(flag, type=kind, default=default, help=text)
    pretrain.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations to save memory")
    pretrain.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                          help="autocast dtype on CUDA (fp16 with a GradScaler); fp32 on CPU")
    pretrain.add_argument("--fsdp", action="store_true",
                          help="under torchrun: shard parameters, gradients and optimizer state (FSDP) instead of DDP")
    pretrain.add_argument("--mlm-probability", type=float, default=0.15,
                          help="masked LM (encoders): share of tokens chosen for prediction")
    pretrain.set_defaults(func=cmd_pretrain)

    size = sub.add_parser("size", help="sizing tools: compute-optimal size, scaling-law fit, critical batch size",
                          description="Plan a run before spending its compute (see docs/training.md).")
    size_sub = size.add_subparsers(dest="size_command", required=True, metavar="SIZE_COMMAND")
    chinchilla = size_sub.add_parser("chinchilla", help="compute-optimal parameters and tokens for a FLOP budget",
                                     description="Hoffmann et al. 2022: the closed-form optimum of the fitted loss "
                                                 "L(N,D) = E + A/N^a + B/D^b under C = 6ND ('fit'), and the ~20 "
                                                 "tokens per parameter rule ('rule'). Prints JSON.")
    chinchilla.add_argument("--flops", type=float, default=None, help="training compute budget C in FLOPs")
    chinchilla.add_argument("--parameters", type=float, default=None, help="with --tokens: C = 6 x parameters x tokens")
    chinchilla.add_argument("--tokens", type=float, default=None, help="with --parameters")
    chinchilla.add_argument("--method", choices=("fit", "rule", "both"), default="both")
    chinchilla.add_argument("--tokens-per-parameter", type=float, default=20.0, help="for --method rule")
    chinchilla.set_defaults(func=cmd_size_chinchilla)
    fit = size_sub.add_parser("fit", help="fit L(C) = a*C^-b (+ e) to measured (compute, loss) points",
                              description="Least squares on log loss with scipy; prints the fit as JSON and "
                                          "optionally plots it.")
    fit.add_argument("--points", default=None, help="CSV with a header and columns compute,loss")
    fit.add_argument("--runs", nargs="+", default=None, help="finished `genforge pretrain` run directories")
    fit.add_argument("--irreducible", action="store_true", help="fit an irreducible loss term e too")
    fit.add_argument("--plot", default=None, help="write a log-log PNG of points and fit here")
    fit.add_argument("--extrapolate", type=float, nargs="+", default=None, metavar="FLOPS",
                     help="print the predicted loss at these compute budgets")
    fit.set_defaults(func=cmd_size_fit)
    noise = size_sub.add_parser("noise-scale", help="gradient noise scale (critical batch size) of a model on data",
                                description="McCandlish et al. 2018: squared gradient norms at two batch sizes "
                                            "give |G|^2 and tr(Sigma); B_simple = tr(Sigma)/|G|^2. Prints JSON.")
    noise.add_argument("--model", required=True, help="causal model directory (config.json + safetensors)")
    noise.add_argument("--tokenizer", default=None, help="tokenizer directory for --text (default: --model)")
    noise.add_argument("--text", default=None, help="UTF-8 text to sample batches from")
    noise.add_argument("--data", default=None, help="a `genforge data prepare` directory")
    noise.add_argument("--val-fraction", type=float, default=0.05, help=argparse.SUPPRESS)
    noise.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128 with --text)")
    noise.add_argument("--small", type=int, default=2, help="small batch size, in sequences")
    noise.add_argument("--big", type=int, default=16, help="big batch size, in sequences")
    noise.add_argument("--trials", type=int, default=8, help="gradient pairs averaged")
    noise.add_argument("--seed", type=int, default=0)
    noise.add_argument("--device", default="cpu")
    noise.set_defaults(func=cmd_size_noise_scale)

    watermark = sub.add_parser("watermark", help="detect a green-list watermark in text",
                               description="Watermark tools (Kirchenbauer et al. 2023).")
    watermark_sub = watermark.add_subparsers(dest="watermark_command", required=True, metavar="WATERMARK_COMMAND")
    detect = watermark_sub.add_parser("detect", help="z-test for the green-list watermark",
                                      description="Re-tokenize the text with the model's tokenizer and count green "
                                                  "tokens; prints the z-score, p-value and verdict as JSON.")
    detect.add_argument("--model", required=True, help="the model directory (its tokenizer and vocabulary size)")
    detect.add_argument("--text", default=None, help="text file (default: standard input)")
    detect.add_argument("--key", type=int, required=True, help="the key used with --watermark")
    detect.add_argument("--gamma", type=float, default=0.25, help="green fraction used when generating")
    detect.add_argument("--z-threshold", type=float, default=4.0, help="z-score above which text is called marked")
    detect.set_defaults(func=cmd_watermark_detect)

    evaluate = sub.add_parser("eval", help="evaluate text or models", description="Evaluation commands.")
    eval_sub = evaluate.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")
    metrics = eval_sub.add_parser("metrics", help="reference-based metrics over prediction/reference files",
                                  description="Score predictions (one per line) against references (one file per "
                                              "reference set, one line per prediction). Prints a Markdown table.")
    metrics.add_argument("--pred", required=True, help="predictions, one per line")
    metrics.add_argument("--ref", action="append", default=[], help="references, one per line (repeatable)")
    metrics.add_argument("--metrics", default="bleu,chrf,rouge",
                         help="comma-separated: bleu, chrf, rouge, meteor, squad, distinct_n, self_bleu, bertscore")
    metrics.add_argument("--out", default=None, help="also write the full results (settings included) as JSON")
    metrics.set_defaults(func=cmd_eval_metrics)
    ppl = eval_sub.add_parser("ppl", help="perplexity of a model over a text file",
                              description="Strided-window perplexity of a causal model over a text file.")
    model_flags(ppl)
    ppl.add_argument("--text", required=True, help="UTF-8 text file")
    ppl.add_argument("--max-length", type=int, default=None, help="window length (default: the model's context)")
    ppl.add_argument("--stride", type=int, default=None, help="window step (default: half the window)")
    ppl.set_defaults(func=cmd_eval_ppl)
    harness = eval_sub.add_parser("harness", help="run lm-evaluation-harness-style YAML tasks on a model",
                                  description="Run tasks written in lm-evaluation-harness's YAML conventions over "
                                              "local JSONL data; prints a Markdown table (see docs/evaluation.md).")
    harness.add_argument("--model", default=None, help="Hugging Face model directory, run in-process")
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
    judge = eval_sub.add_parser("judge", help="ratings from pairwise judgments",
                                description="Aggregate pairwise battles (JSONL lines {model_a, model_b, winner: "
                                            "A|B|tie}) into Bradley-Terry or Elo ratings, optionally with bootstrap "
                                            "intervals and agreement with human labels; or first have an LLM judge "
                                            "behind an OpenAI-compatible endpoint produce the battles (--answers).")
    judge.add_argument("--battles", default=None,
                       help="JSONL battles to rate (with --answers: where to write the judged battles)")
    judge.add_argument("--answers", default=None,
                       help="JSONL lines {question, answers: {model: answer}} for an LLM judge to compare pairwise, "
                            "in both orders (needs --endpoint and --judge-model)")
    judge.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL of the judge, e.g. "
                                                        "http://localhost:8000/v1")
    judge.add_argument("--judge-model", default=None, help="the judge's model name on that server")
    judge.add_argument("--api-key", default=None, help="Bearer key for the endpoint")
    judge.add_argument("--method", choices=("bradley-terry", "elo"), default="bradley-terry")
    judge.add_argument("--bootstrap", type=int, default=0, help="bootstrap rounds for 95%% intervals (0: none)")
    judge.add_argument("--seed", type=int, default=0)
    judge.add_argument("--human", default=None, help="JSONL with a human 'winner' per battle, same order: Cohen's kappa")
    judge.set_defaults(func=cmd_eval_judge)
    ab = eval_sub.add_parser("ab", help="A/B test two systems' per-item scores",
                             description="Compare per-item scores of system A and B (one number per line). 0/1 scores "
                                         "get a two-proportion z-test, others Welch's t-test; both get a bootstrap "
                                         "interval for B - A. --sample-size plans how many items a test needs.")
    ab.add_argument("--a", default=None, help="scores of system A")
    ab.add_argument("--b", default=None, help="scores of system B")
    ab.add_argument("--alpha", type=float, default=0.05, help="significance level")
    ab.add_argument("--power", type=float, default=0.8, help="power, for --sample-size")
    ab.add_argument("--sample-size", type=float, nargs=2, metavar=("RATE_A", "RATE_B"), default=None,
                    help="items per arm to tell these two pass rates apart")
    ab.add_argument("--seed", type=int, default=0)
    ab.set_defaults(func=cmd_eval_ab)

    # Each subsystem keeps its own commands beside its code (train/cli.py, rag/cli.py,
    # serve/cli.py); they follow the same rule as this file: parse, call the library, print.
    for module in _SUBSYSTEM_COMMANDS:
        importlib.import_module(module).add_commands(sub)
    return parser


_SUBSYSTEM_COMMANDS = ("genforge.train.cli", "genforge.rag.cli", "genforge.serve.cli")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[bold red]error:[/bold red] {err}")
        return 2
    except KeyboardInterrupt:
        console.print("[dim]interrupted[/dim]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
