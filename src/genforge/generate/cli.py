"""`genforge generate`, `chat`, `convert` and `watermark detect`, registered by `genforge.cli`:
the commands that run a model directory. They parse flags, call the library (`decode.decode`,
`loading.load_for_inference`) and print.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..cache import KV_CACHE_DTYPES
from ..checkpoint import read_config, read_generation_config
from ..console import console
from ..loading import LoadedModel, load_for_inference, load_packed_model
from ..ops.registry import model_dir_argument
from .beam import BeamOptions
from .contrastive import ContrastiveDecodingOptions, ContrastiveSearchOptions
from .decode import STRATEGIES, SampleOptions, check_strategy, decode, decode_stream, encode_prompts
from .ensemble import AVERAGES, ModelEnsemble
from .sampling import SamplingParams
from .seq2seq import check_encoder_decoder_strategy
from .speculative import PromptLookupOptions, SpeculativeOptions
from .watermark import Watermark


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--model (required), --adapter, --dtype and --device: a model directory to run in-process."""
    parser.add_argument(
        "--model",
        required=True,
        type=model_dir_argument,
        help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json), or registry:NAME@ALIAS / "
        "registry:NAME/VERSION",
    )
    parser.add_argument(
        "--adapter",
        default=None,
        type=model_dir_argument,
        help="an adapter directory (`genforge finetune`'s OUT/adapter, or PEFT's): LoRA, DoRA and IA3 are merged "
        "into the weights, prompt methods and bottleneck adapters run as loaded",
    )
    parser.add_argument("--dtype", default=None, help="float32 (CPU default), bfloat16, float16 or auto (checkpoint's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


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
    group.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        metavar="ID=BIAS",
        help="add BIAS to token ID's logit (repeatable; -inf bans it)",
    )
    group.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    group.add_argument(
        "--stop-token-id",
        action="append",
        type=int,
        default=[],
        metavar="ID",
        help="stop at this token id (repeatable)",
    )
    group.add_argument("--seed", type=int, default=None, help="random seed, for reproducible samples")


def _add_context_limit_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--context-limit",
        type=int,
        default=None,
        metavar="TOKENS",
        help="most tokens a prompt plus its generation may reach (default: the model's context; a model with "
        "dynamic RoPE scaling defaults to factor x its trained context and may be given more)",
    )


def _add_kv_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default="auto",
        help="what the KV cache stores: auto (the model's dtype) or int8 (int8 codes with an fp32 scale per "
        "token and head: about a quarter of fp32's memory; docs/compression.md)",
    )


def _sampling_params(args, generation_config: dict) -> SamplingParams:
    bias = {}
    for item in args.logit_bias:
        token, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--logit-bias takes ID=BIAS, got {item!r}")
        bias[int(token)] = float(value)
    return SamplingParams.from_generation_config(
        generation_config,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        typical_p=args.typical_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        logit_bias=bias or None,
        min_new_tokens=args.min_new_tokens,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        stop_token_ids=args.stop_token_id,
        seed=args.seed,
    )


def _load(args) -> LoadedModel:
    if getattr(args, "tensor_parallel", False):
        from ..train.tensor_parallel import load_tensor_parallel

        return load_tensor_parallel(
            args.model, dtype=args.dtype, device=args.device, adapter=args.adapter, context_limit=args.context_limit
        )
    with console.status(f"loading {args.model}"):
        return load_for_inference(
            args.model,
            dtype=args.dtype,
            device=args.device,
            adapter=args.adapter,
            context_limit=getattr(args, "context_limit", None),
        )


def _check_strategy_flags(args) -> None:
    """Refuse flags the chosen strategy would silently ignore, before loading anything (what a
    strategy cannot do at all, `decode.check_strategy` refuses after these)."""
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
    if args.ensemble and args.strategy != "sample":
        raise ValueError("--ensemble applies to --strategy sample")
    if args.ensemble_weights and len(args.ensemble_weights) != 1 + len(args.ensemble or ()):
        raise ValueError(
            f"--ensemble-weights takes one weight for --model and one per --ensemble model "
            f"({1 + len(args.ensemble or ())}), got {len(args.ensemble_weights)}"
        )
    given = [
        flag
        for flag, value in (("--json-schema", args.json_schema), ("--regex", args.regex), ("--choices", args.choices))
        if value
    ]
    if len(given) > 1:
        raise ValueError(f"use one output constraint at a time, got {' and '.join(given)}")
    if given and args.strategy != "sample":
        raise ValueError(f"{given[0]} applies to --strategy sample")
    if args.json_schema and not Path(args.json_schema).is_file():
        raise ValueError(f"--json-schema {args.json_schema} is not a file")
    if args.early_exit is not None:
        _check_early_exit_flags(args, given)


# ------------------------------------------------------------------ early exit (early_exit.py)
def _check_early_exit_flags(args, constraints: list[str]) -> None:
    others = [
        flag
        for flag, used in (
            (f"--strategy {args.strategy}", args.strategy != "sample"),
            ("--temperature > 0", bool(args.temperature)),
            ("--watermark", args.watermark is not None),
            ("--ensemble", bool(args.ensemble)),
            ("--stop", bool(args.stop)),
            (constraints[0] if constraints else "", bool(constraints)),
        )
        if used
    ]
    if others:
        raise ValueError(f"--early-exit decodes greedily token by token; it does not combine with {', '.join(others)}")
    if not 0 < args.early_exit <= 1:
        raise ValueError(f"--early-exit takes a confidence threshold in (0, 1] (1: never exit), got {args.early_exit}")


def _early_exit_samples(args, loaded: LoadedModel, prompts) -> int:
    from ..early_exit import early_exit_generate
    from .generator import continuation_text

    for index, prompt in enumerate(prompts):
        result = early_exit_generate(
            loaded.model,
            prompt,
            args.max_new_tokens,
            args.early_exit,
            measure=args.early_exit_measure,
            min_layers=args.early_exit_min_layers,
            eos_token_ids=loaded.eos_token_ids,
            vocab_limit=loaded.tokenizer.vocab_size,
        )
        console.print(
            f"[dim]{len(result.tokens)} tokens, {result.average_layers:.2f} of {result.num_layers} layers per "
            "token on average[/dim]"
        )
        text = continuation_text(loaded.tokenizer, prompt, result.tokens)
        print(text if len(prompts) == 1 else json.dumps({"prompt": args.prompt[index], "completion": text}))
    return 0


def _strategy_options(args):
    """The chosen strategy's options from its flags; a draft or amateur model is added once loaded."""
    if args.strategy in ("beam", "diverse-beam"):
        diverse = args.strategy == "diverse-beam"
        return BeamOptions(
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
            early_stopping=args.early_stopping,
            num_return_sequences=args.num_return_sequences,
            num_beam_groups=args.num_beam_groups if diverse else 1,
            diversity_penalty=args.diversity_penalty if diverse else 0.0,
            do_sample=args.do_sample,
        )
    if args.strategy == "contrastive":
        return ContrastiveSearchOptions(penalty_alpha=args.penalty_alpha)
    if args.strategy == "contrastive-decoding":
        return ContrastiveDecodingOptions(alpha=args.plausibility_alpha)
    if args.strategy == "speculative":
        return SpeculativeOptions(num_draft_tokens=args.num_draft_tokens, draft_confidence=args.draft_confidence)
    if args.strategy == "prompt-lookup":
        return PromptLookupOptions(num_draft_tokens=args.num_draft_tokens)
    watermark = None
    if args.watermark is not None:
        watermark = Watermark(key=args.watermark, gamma=args.watermark_gamma, delta=args.watermark_delta)
    return SampleOptions(
        json_schema=Path(args.json_schema).read_text() if args.json_schema else None,
        regex=args.regex,
        choices=args.choices,
        watermark=watermark,
    )


def cmd_generate(args) -> int:
    if args.tensor_parallel:
        from ..train.tensor_parallel import run_tensor_parallel

        def generate_on(device) -> int:
            return _generate(argparse.Namespace(**{**vars(args), "device": device}))

        return run_tensor_parallel(generate_on, args.device)
    return _generate(args)


def _generate(args) -> int:
    # Everything that can be checked without the weights is, before they are loaded.
    params = _sampling_params(args, read_generation_config(args.model))
    _check_strategy_flags(args)
    options = check_strategy(args.strategy, params, _strategy_options(args), len(args.prompt))
    check_encoder_decoder_strategy(read_config(args.model), args.strategy, options, ensemble=bool(args.ensemble))
    loaded = _load(args)
    if args.strategy == "speculative":
        options = dataclasses.replace(
            options, draft=load_packed_model(args.draft, dtype=args.dtype, device=args.device)
        )
    elif args.strategy == "contrastive-decoding":
        amateur = load_packed_model(args.amateur, dtype=args.dtype, device=args.device)
        options = dataclasses.replace(options, amateur=amateur)
    elif args.ensemble:
        others = [load_packed_model(path, dtype=args.dtype, device=args.device) for path in args.ensemble]
        ensemble = ModelEnsemble([loaded.model, *others], args.ensemble_weights, args.ensemble_average)
        options = dataclasses.replace(options, ensemble=ensemble)
    prompts = encode_prompts(loaded.tokenizer, args.prompt, chat=args.chat)
    if args.early_exit is not None:
        return _early_exit_samples(args, loaded, prompts)
    if args.strategy == "sample":
        return _stream_samples(args, loaded, prompts, params, options)
    outputs = decode(
        args.strategy,
        loaded.model,
        loaded.tokenizer,
        prompts,
        params,
        options,
        eos_token_ids=loaded.eos_token_ids,
        generation_config=loaded.generation_config,
        kv_cache_dtype=args.kv_cache_dtype,
    )
    stats = outputs[0].stats
    if stats is not None:
        console.print(
            f"[dim]{stats.generated} tokens in {stats.target_forwards} target passes; acceptance rate "
            f"{stats.acceptance_rate:.2f}, {stats.tokens_per_target_forward:.2f} tokens per target pass[/dim]"
        )
    for out in outputs:
        if len(outputs) == 1:
            print(out.text)
            continue
        score = {} if out.score is None else {"score": round(out.score, 6)}
        print(
            json.dumps(
                {
                    "prompt": args.prompt[out.prompt_index],
                    "completion": out.text,
                    **score,
                    "finish_reason": out.finish_reason,
                },
                ensure_ascii=False,
            )
        )
    return 0


def _stream_samples(args, loaded: LoadedModel, prompts, params, options) -> int:
    outputs = [""] * len(prompts)
    reasons = [None] * len(prompts)
    for event in decode_stream(
        "sample",
        loaded.model,
        loaded.tokenizer,
        prompts,
        params,
        options,
        eos_token_ids=loaded.eos_token_ids,
        generation_config=loaded.generation_config,
        kv_cache_dtype=args.kv_cache_dtype,
    ):
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


def cmd_chat(args) -> int:
    params = _sampling_params(args, read_generation_config(args.model))
    loaded = _load(args)
    tokenizer = loaded.tokenizer
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
        for event in decode_stream(
            "sample",
            loaded.model,
            tokenizer,
            [prompt],
            params,
            eos_token_ids=loaded.eos_token_ids,
            kv_cache_dtype=args.kv_cache_dtype,
        ):
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
    console.print(
        f"wrote {model.config.family} model ({model.config.num_parameters() / 1e6:.1f}M parameters, "
        f"{model.dtype}) to {out}"
    )
    return 0


def cmd_watermark_detect(args) -> int:
    from ..checkpoint import read_config
    from ..tokenizer import Tokenizer
    from .watermark import detect_watermark

    text = Path(args.text).read_text(encoding="utf-8") if args.text else sys.stdin.read()
    vocab_size = read_config(args.model).vocab_size
    ids = Tokenizer.from_dir(args.model).encode(text, add_special_tokens=False)
    result = detect_watermark(ids, vocab_size, key=args.key, gamma=args.gamma, z_threshold=args.z_threshold)
    print(
        json.dumps(
            {
                "watermarked": result.is_watermarked,
                "z_score": round(result.z_score, 3),
                "p_value": result.p_value,
                "green": result.num_green,
                "scored": result.num_scored,
                "green_fraction": round(result.green_fraction, 4),
            },
            indent=2,
        )
    )
    return 0


def _early_stopping(value: str):
    table = {"true": True, "false": False, "never": "never"}
    if value.lower() not in table:
        raise argparse.ArgumentTypeError(f"expected true, false or never, got {value!r}")
    return table[value.lower()]


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge generate`, `chat`, `convert` and `watermark` to the top-level parser."""
    gen = sub.add_parser(
        "generate",
        help="complete one or more prompts",
        description="Generate text from prompts; a single prompt streams to stdout, several print one JSON line each.",
    )
    add_model_flags(gen)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable: a batch)")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn with the chat template")
    _add_context_limit_flag(gen)
    _add_kv_cache_flag(gen)
    gen.add_argument(
        "--tensor-parallel",
        action="store_true",
        help="under torchrun, shard the model's heads and MLP over the job's processes (torchrun --nproc-per-node N "
        "-m genforge.cli generate --tensor-parallel ...); the degree must divide the heads and intermediate size",
    )
    _add_sampling_flags(gen)
    strategy = gen.add_argument_group("decoding strategy")
    strategy.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="sample",
        help="sample: token by token with the sampling flags (temperature 0 is greedy), streamed; "
        "beam / diverse-beam: beam search; speculative: a --draft model proposes tokens the "
        "target verifies (same output distribution); prompt-lookup: drafts copied from the "
        "prompt",
    )
    strategy.add_argument("--num-beams", type=int, default=4, help="beams (beam strategies)")
    strategy.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="beam score = log-prob / length**penalty; > 0 favours longer outputs",
    )
    strategy.add_argument(
        "--early-stopping",
        default=False,
        type=_early_stopping,
        help="beam: true (stop at num_beams finished), false (heuristic) or never",
    )
    strategy.add_argument("--num-return-sequences", type=int, default=1, help="beam hypotheses to print per prompt")
    strategy.add_argument(
        "--do-sample",
        action="store_true",
        help="beam: beam sampling, drawing candidates through --temperature/--top-k/--top-p",
    )
    strategy.add_argument("--num-beam-groups", type=int, default=1, help="diverse-beam: groups of beams")
    strategy.add_argument(
        "--diversity-penalty",
        type=float,
        default=0.5,
        help="diverse-beam: Hamming penalty on tokens chosen by earlier groups",
    )
    strategy.add_argument(
        "--penalty-alpha",
        type=float,
        default=0.6,
        help="contrastive: weight of the degeneration penalty (0 is greedy); uses --top-k (default 4)",
    )
    strategy.add_argument("--amateur", default=None, help="contrastive-decoding: the amateur model directory")
    strategy.add_argument(
        "--plausibility-alpha",
        type=float,
        default=0.1,
        help="contrastive-decoding: keep tokens with p_expert >= alpha x the top probability",
    )
    strategy.add_argument("--draft", default=None, help="speculative: draft model directory")
    strategy.add_argument("--num-draft-tokens", type=int, default=4, help="speculative / prompt-lookup: k per round")
    strategy.add_argument(
        "--draft-confidence",
        type=float,
        default=0.0,
        help="speculative: stop a round's drafting after a draft token the draft model gives less "
        "than this probability (dynamic draft length; 0 always drafts k; speed only)",
    )
    shape = gen.add_argument_group("constrained output (through llguidance; needs a byte-level BPE tokenizer)")
    shape.add_argument("--json-schema", default=None, metavar="FILE", help="output is JSON valid under this schema")
    shape.add_argument("--regex", default=None, help="output matches this regular expression in full")
    shape.add_argument("--choices", nargs="+", default=None, help="output is exactly one of these strings")
    mark = gen.add_argument_group("watermark (Kirchenbauer et al. 2023)")
    mark.add_argument(
        "--watermark",
        type=int,
        default=None,
        metavar="KEY",
        help="bias a keyed green list of tokens; detect later with `genforge watermark detect`",
    )
    mark.add_argument("--watermark-gamma", type=float, default=0.25, help="fraction of the vocabulary that is green")
    mark.add_argument("--watermark-delta", type=float, default=2.0, help="logit bias added to green tokens")
    together = gen.add_argument_group("ensemble: several models sharing the tokenizer choose each token")
    together.add_argument(
        "--ensemble", nargs="+", metavar="DIR", help="other model directories to ensemble with --model"
    )
    together.add_argument(
        "--ensemble-weights", type=float, nargs="+", metavar="W", help="one per model, --model first (default: equal)"
    )
    together.add_argument(
        "--ensemble-average",
        choices=AVERAGES,
        default="probability",
        help="mix the probabilities, or average the log-probabilities (a product of experts)",
    )
    early = gen.add_argument_group(
        "early exit (CALM, Schuster et al. 2022): greedy, each token leaves at a confident layer"
    )
    early.add_argument(
        "--early-exit",
        type=float,
        default=None,
        metavar="THRESHOLD",
        help="exit a token at the first layer whose shared-head confidence reaches this (0..1; 1 never exits)",
    )
    early.add_argument(
        "--early-exit-measure", choices=("max_prob", "margin"), default="max_prob", help="confidence measure"
    )
    early.add_argument("--early-exit-min-layers", type=int, default=1, help="run at least this many layers")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser(
        "chat",
        help="interactive chat with streamed replies",
        description="Chat in the terminal; turns are rendered with the model's chat template.",
    )
    add_model_flags(chat)
    chat.add_argument("--system", default=None, help="system prompt")
    _add_context_limit_flag(chat)
    _add_kv_cache_flag(chat)
    _add_sampling_flags(chat)
    chat.set_defaults(func=cmd_chat)

    convert = sub.add_parser(
        "convert",
        help="load a model and export it as a Hugging Face directory",
        description="Round-trip a checkpoint through genforge: change dtype or re-shard.",
    )
    convert.add_argument("--model", required=True, help="source Hugging Face model directory")
    convert.add_argument("--out", required=True, help="target directory (replaced atomically)")
    convert.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (keep the checkpoint's)")
    convert.add_argument("--max-shard-mb", type=float, default=5120, help="split weights into shards of this size")
    convert.set_defaults(func=cmd_convert)

    watermark = sub.add_parser(
        "watermark",
        help="detect a green-list watermark in text",
        description="Watermark tools (Kirchenbauer et al. 2023).",
    )
    watermark_sub = watermark.add_subparsers(dest="watermark_command", required=True, metavar="WATERMARK_COMMAND")
    detect = watermark_sub.add_parser(
        "detect",
        help="z-test for the green-list watermark",
        description="Re-tokenize the text with the model's tokenizer and count green "
        "tokens; prints the z-score, p-value and verdict as JSON.",
    )
    detect.add_argument("--model", required=True, help="the model directory (its tokenizer and vocabulary size)")
    detect.add_argument("--text", default=None, help="text file (default: standard input)")
    detect.add_argument("--key", type=int, required=True, help="the key used with --watermark")
    detect.add_argument("--gamma", type=float, default=0.25, help="green fraction used when generating")
    detect.add_argument("--z-threshold", type=float, default=4.0, help="z-score above which text is called marked")
    detect.set_defaults(func=cmd_watermark_detect)
