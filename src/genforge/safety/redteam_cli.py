"""`genforge safety redteam`: run the red-teaming attack set against a served or local model and
write a Markdown report (with the full results as JSON beside it)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .redteam import GOALS, MUTATIONS

    categories = sorted({g.category for g in GOALS})
    parser.description = (
        "Send attack prompts (goals x templates x mutations: paraphrase, base64, leetspeak, role-play, "
        "multi-turn escalation) to a model and report the attack success rate per category and mutation."
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--endpoint", default=None, metavar="URL", help="an OpenAI-compatible base URL (…/v1)")
    target.add_argument("--model", default=None, metavar="DIR", help="a local genforge or Hugging Face model directory")
    parser.add_argument("--endpoint-model", default="default", help="the model name the endpoint serves")
    parser.add_argument("--api-key", default=None, help="the endpoint's API key (default: $OPENAI_API_KEY or none)")
    parser.add_argument(
        "--scorer",
        choices=("refusal", "judge", "both"),
        default="refusal",
        help="refusal: no refusal = success (an upper bound); judge: a judge model decides; both: success only if "
        "neither the refusal rule nor the judge objects",
    )
    parser.add_argument("--judge-endpoint", default=None, metavar="URL", help="judge: an OpenAI-compatible base URL")
    parser.add_argument("--judge-endpoint-model", default="default", help="judge: the model name that endpoint serves")
    parser.add_argument("--judge-model", default=None, metavar="DIR", help="judge: a local model directory")
    parser.add_argument("--categories", default=None, help=f"comma-separated subset of: {','.join(categories)}")
    parser.add_argument("--mutations", default=None, help=f"comma-separated subset of: {','.join(MUTATIONS)}")
    parser.add_argument("--system", default=None, help="a system prompt sent before every attack")
    parser.add_argument("--max-tokens", type=int, default=256, help="reply length limit per turn")
    parser.add_argument("--out", default="redteam.md", help="the Markdown report (results JSON beside it)")


def _chat_model(endpoint: str | None, endpoint_model: str, api_key: str | None, directory: str | None):
    from ..chat_models import EndpointChatModel, LocalChatModel

    if endpoint:
        return EndpointChatModel(endpoint_model, base_url=endpoint, api_key=api_key)
    return LocalChatModel(directory)


def _subset(value: str | None, accepted: list[str], what: str) -> list[str]:
    if value is None:
        return list(accepted)
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in accepted]
    if unknown or not chosen:
        raise ValueError(f"--{what}: unknown or empty {unknown or value!r}; accepted: {', '.join(accepted)}")
    return chosen


def run(args: argparse.Namespace) -> int:
    import os

    from ..console import console
    from .redteam import GOALS, MUTATIONS, AllOf, JudgeScorer, RefusalScorer, build_attacks, run_redteam

    categories = _subset(args.categories, sorted({g.category for g in GOALS}), "categories")
    mutations = _subset(args.mutations, list(MUTATIONS), "mutations")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.scorer != "refusal" and not (args.judge_endpoint or args.judge_model):
        raise ValueError(f"--scorer {args.scorer} needs a judge: --judge-endpoint URL or --judge-model DIR")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY") or "none"
    model = _chat_model(args.endpoint, args.endpoint_model, api_key, args.model)
    scorer = RefusalScorer()
    if args.scorer != "refusal":
        judge = JudgeScorer(_chat_model(args.judge_endpoint, args.judge_endpoint_model, api_key, args.judge_model))
        scorer = judge if args.scorer == "judge" else AllOf(RefusalScorer(), judge)
    attacks = build_attacks([g for g in GOALS if g.category in categories], mutations)
    target = args.endpoint or args.model
    report = run_redteam(
        model,
        attacks,
        scorer,
        max_tokens=args.max_tokens,
        system=args.system,
        settings={"target": target, "scorer choice": args.scorer},
    )
    md_path, json_path = report.write(args.out)
    rate = report.attack_success_rate
    console.print(f"attack success rate {rate:.1%} over {len(report.results)} attacks; wrote {md_path} and {json_path}")
    return 0
