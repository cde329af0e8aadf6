"""`genforge generate`, `chat`, `convert` and `watermark detect`, registered by `genforge.cli`:
the commands that run a model directory. They parse, call the library and print.

The strategy dispatch (`_run_strategy`, `_stream_samples`, `_constraints`) is still this
view's own; it gives way to the library's one decode entry point once that lands.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..console import console


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--model (required), --dtype and --device: a model directory to run in-process."""
    parser.add_argument("--model", required=True, help="Hugging Face model directory (config.json, *.safetensors, "
                                                       "tokenizer.json)")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16 or auto (checkpoint's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


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
    from .sampling import SamplingParams

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
    from ..checkpoint import load_model
    from ..inference import pack_for_cpu_inference
    from ..tokenizer import Tokenizer

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
    from ..checkpoint import read_generation_config
    from .generator import continuation_text, only_text_tokens
    from .request import end_of_sequence_ids

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
            from .watermark import Watermark

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
    from .generator import stream

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
        from .beam import beam_search
        from .processors import build_processors
        from .sampling import make_generator

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
        from . import contrastive
        from .processors import build_processors

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
    from .speculative import prompt_lookup_generate, speculative_generate

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
    from . import constrained

    if args.json_schema:
        return [constrained.JsonSchemaConstraint(Path(args.json_schema).read_text(), tokenizer, eos_token_ids=eos)]
    if args.regex:
        return [constrained.RegexConstraint(args.regex, tokenizer, eos_token_ids=eos)]
    if args.choices:
        return [constrained.ChoiceConstraint(args.choices, tokenizer, eos_token_ids=eos)]
    return []


def _load_model_only(args, directory):
    from ..checkpoint import load_model
    from ..inference import pack_for_cpu_inference

    return pack_for_cpu_inference(load_model(directory, dtype=args.dtype, device=args.device))


def _deterministic(params):
    import dataclasses

    return dataclasses.replace(params, temperature=0.0)


def cmd_chat(args) -> int:
    from ..checkpoint import read_generation_config
    from .generator import stream
    from .request import end_of_sequence_ids

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
    from ..checkpoint import load_model, save_model
    from ..tokenizer import Tokenizer

    model = load_model(args.model, dtype=args.dtype)
    tokenizer = Tokenizer.from_dir(args.model) if (Path(args.model) / "tokenizer.json").exists() else None
    out = save_model(model, args.out, tokenizer=tokenizer, max_shard_bytes=int(args.max_shard_mb * 2**20))
    console.print(f"wrote {model.config.family} model ({model.config.num_parameters() / 1e6:.1f}M parameters, "
                  f"{model.dtype}) to {out}")
    return 0


def cmd_watermark_detect(args) -> int:
    from ..checkpoint import read_config
    from ..tokenizer import Tokenizer
    from .watermark import detect_watermark

    text = Path(args.text).read_text(encoding="utf-8") if args.text else sys.stdin.read()
    vocab_size = read_config(args.model).vocab_size
    ids = Tokenizer.from_dir(args.model).encode(text, add_special_tokens=False)
    result = detect_watermark(ids, vocab_size, key=args.key, gamma=args.gamma, z_threshold=args.z_threshold)
    print(json.dumps({"watermarked": result.is_watermarked, "z_score": round(result.z_score, 3),
                      "p_value": result.p_value, "green": result.num_green, "scored": result.num_scored,
                      "green_fraction": round(result.green_fraction, 4)}, indent=2))
    return 0


def _early_stopping(value: str):
    table = {"true": True, "false": False, "never": "never"}
    if value.lower() not in table:
        raise argparse.ArgumentTypeError(f"expected true, false or never, got {value!r}")
    return table[value.lower()]


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge generate`, `chat`, `convert` and `watermark` to the top-level parser."""
    gen = sub.add_parser("generate", help="complete one or more prompts", description="Generate text from prompts; a "
                         "single prompt streams to stdout, several print one JSON line each.")
    add_model_flags(gen)
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
    add_model_flags(chat)
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
