"""`genforge prompt render|compress`, registered by `genforge.cli`.

A view over `genforge.prompting`: render a prompt template with variables, or compress a
prompt file under a token budget with a small causal LM. Results go to stdout, notes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..console import console


def _variables(pairs: list[str] | None, json_source: str | None) -> dict:
    values: dict = {}
    if json_source:
        text = Path(json_source).read_text(encoding="utf-8") if Path(json_source).is_file() else json_source
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"--vars-json is neither a JSON file nor a JSON object ({err})") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--vars-json must hold a JSON object of variables, got {type(loaded).__name__}")
        values.update(loaded)
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--vars takes NAME=VALUE pairs, got {pair!r}")
        if value.startswith("@"):  # NAME=@file reads the value from a file, as curl does
            value = Path(value[1:]).read_text(encoding="utf-8")
        values[name] = value
    return values


def cmd_render(args) -> int:
    from .templates import load_template

    if args.template == "-":
        template = load_template(sys.stdin.read(), name="stdin")
    else:
        template = load_template(Path(args.template))
    values = _variables(args.vars, args.vars_json)
    if args.messages:
        print(json.dumps(template.messages(**values), ensure_ascii=False, indent=2))
    else:
        sys.stdout.write(template.render(**values))
        if not template.template.endswith("\n"):
            sys.stdout.write("\n")
    return 0


def cmd_compress(args) -> int:
    from ..loading import load_for_inference
    from .compression import CausalLMScorer, compress_prompt, split_marked

    if args.budget < 1:
        raise ValueError(f"--budget must be a positive number of tokens, got {args.budget}")
    text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    segments = split_marked(text)  # a bad marker fails before the model loads
    if not Path(args.model, "config.json").is_file():
        raise ValueError(f"--model {args.model} is not a model directory (no config.json)")
    with console.status(f"loading {args.model}"):
        loaded = load_for_inference(args.model)
    scorer = CausalLMScorer(loaded.model, loaded.tokenizer)
    count = None
    if args.tokenizer:
        from ..tokenizer import Tokenizer
        from .fewshot import token_counter

        count = token_counter(Tokenizer.from_dir(args.tokenizer))
    result = compress_prompt(segments, scorer, args.budget, count_tokens=count)
    if args.json:
        print(
            json.dumps(
                {
                    "text": result.text,
                    "original_tokens": result.original_tokens,
                    "compressed_tokens": result.compressed_tokens,
                    "ratio": round(result.ratio, 3),
                    "dropped_words": result.dropped_words,
                },
                ensure_ascii=False,
            )
        )
    else:
        print(result.text)
        console.print(
            f"[dim]{result.original_tokens} -> {result.compressed_tokens} tokens ({result.ratio:.2f}x), "
            f"{len(result.dropped_words)} words dropped[/dim]"
        )
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge prompt ...` to the top-level parser."""
    prompt = sub.add_parser(
        "prompt",
        help="prompt templates and compression",
        description="Render prompt templates with declared variables, and compress prompts under a token "
        "budget (see docs/agents.md).",
    )
    prompt_sub = prompt.add_subparsers(dest="prompt_command", required=True)

    render = prompt_sub.add_parser(
        "render",
        help="render a prompt template",
        description="Render a template file (.yaml/.json spec, or text with optional front matter). A missing "
        "or undeclared variable is an error that names it.",
    )
    render.add_argument("template", help="template file, or - for stdin")
    render.add_argument("--vars", nargs="*", metavar="NAME=VALUE", help="variables (NAME=@FILE reads a file)")
    render.add_argument("--vars-json", default=None, help="variables as a JSON object, or a JSON file holding one")
    render.add_argument("--messages", action="store_true", help="print chat messages (JSON) instead of text")
    render.set_defaults(func=cmd_render)

    compress = prompt_sub.add_parser(
        "compress",
        help="compress a prompt to a token budget (LLMLingua-style)",
        description="Drop the words a small causal LM finds least surprising until the prompt fits the budget. "
        "Text between <keep> and </keep> (the instruction, the question) is never dropped.",
    )
    compress.add_argument("file", help="prompt file, or - for stdin")
    compress.add_argument("--budget", type=int, required=True, help="at most this many tokens")
    compress.add_argument(
        "--model", required=True, help="the small causal LM that scores surprisal (a model directory)"
    )
    compress.add_argument(
        "--tokenizer", default=None, help="count the budget with this tokenizer directory (default: the model's)"
    )
    compress.add_argument("--json", action="store_true", help="one JSON object: text, token counts, dropped words")
    compress.set_defaults(func=cmd_compress)
