"""Speculative decoding on trained models: genforge against transformers' assisted generation.

Random weights make speculation meaningless (a random draft never agrees with a random
target), so this script first trains its own pair with genforge's trainer on the Python
standard library's source, which is on every machine: a byte-level BPE tokenizer (2,048
tokens), a target (6 layers, d=256) and a draft (1 layer, d=128) over the same tokenizer. The
draft is then distilled from the target (`prepare`): on text the target samples, trained
towards the target's whole next-token distribution at every position (token-level knowledge
distillation with genforge's Trainer and the target as teacher; the `--distill-*` options;
alpha 0 is the older hard-target distillation on the samples alone). Each stage is cached
under --cache in a directory named by its settings (about 25 minutes of training on 2 cores
the first time), so later runs go straight to the measurement. Both genforge models are
packed for CPU inference, as `genforge generate` loads them.

Then, for held-out prompts (the first tokens of stdlib files not trained on), greedy
continuations are timed in the same process, alternating:

- genforge: the target alone (`generate`), speculative decoding with the draft for several
  k (and once with a dynamic draft length, `draft_confidence`), and prompt lookup;
- transformers: the target alone (`generate`), assisted generation with the same draft
  (`assistant_model`, `num_assistant_tokens`, constant schedule) and prompt lookup
  (`prompt_lookup_num_tokens`).

Greedy outputs must be identical to the target's own (checked). Reported: tokens/s, speedup
over the same library's target-alone run, acceptance rate and tokens per target forward.

    python benchmarks/speculative.py     # writes benchmarks/results/speculative.{json,md}

`--acceptance-only` skips the timing: it prepares the pair for the given distillation settings
and prints genforge's acceptance rate and tokens per target forward at each k (greedy, so
deterministic and independent of machine load), for choosing the distillation settings:

    python benchmarks/speculative.py --acceptance-only --threads 1 --distill-kind tvd --ks 4,8
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import transformers
from machine import describe
from safetensors.torch import load_file, save_file

from genforge.atomic import atomic_path
from genforge.checkpoint import load_model
from genforge.config import Config
from genforge.generate.generator import generate
from genforge.generate.sampling import SamplingParams
from genforge.generate.speculative import prompt_lookup_generate, speculative_generate
from genforge.inference import pack_for_cpu_inference
from genforge.model import Transformer
from genforge.tokenizer import Tokenizer
from genforge.train import DISTILLATION_KINDS, TokenDataset, TrainConfig, Trainer
from genforge.train.tokenizer_training import train_tokenizer as genforge_train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VOCAB_SIZE = 2048
# A draft must cost a small fraction of a target step to pay off (the speed-up is bounded by
# tokens per round / (k x draft cost + verify cost)); at these sizes a draft step is ~1/5 of a
# target step, most of it fixed per-call cost. A larger target (8 layers, d=384) was tried: in
# the ~25 CPU-minutes this script can spend, it trained no better than the draft.
SIZES = {
    "target": dict(hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2, intermediate_size=688),
    "draft": dict(hidden_size=128, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=384),
}
# Peak learning rates: small models take large ones (the quickstart's 128-wide model trains best
# at 1e-2); the wider, deeper target gets a lower one.
LEARNING_RATES = {"target": 4e-3, "draft": 1e-2, "distill": 3e-3}
# The draft's distillation, chosen by acceptance on the held-out prompts (docs/decoding.md, "How
# the draft is distilled"): the divergence, its temperature, the soft-target share of the loss,
# the text it is distilled on and that text's sampling temperature, learning rate, sample count.
DISTILL = {
    "kind": "forward_kl",
    "temperature": 1.0,
    "alpha": 1.0,
    "data": "samples",
    "sample_temperature": 1.0,
    "lr": LEARNING_RATES["distill"],
    "sequences": 1024,
}
# What the draft is distilled on: text sampled from the target, the target's training text, both,
# or text the (undistilled) draft samples itself (on-policy data, as in DistillSpec and GKD).
DISTILL_DATA = ("samples", "corpus", "both", "draft-samples")


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)


def train_tokenizer(files: list[Path], directory: Path) -> Tokenizer:
    """genforge's byte-level BPE trainer. A 2,048-token vocabulary suits a one-megabyte corpus
    and keeps both LM heads small, so a draft step costs little next to a target step."""
    genforge_train_tokenizer(files=files, kind="bpe", vocab_size=VOCAB_SIZE, out_dir=directory, overwrite=True)
    return Tokenizer.from_dir(directory)


def train(
    name: str,
    tokenizer: Tokenizer,
    ids: list[int],
    out: Path,
    steps: int,
    start: Transformer | None = None,
    lr: float | None = None,
    teacher: Transformer | None = None,
    distill: dict | None = None,
    directory: str | None = None,
) -> Transformer:
    config = Config(
        family="llama",
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **SIZES[name.split("-")[0]],
    )
    torch.manual_seed(0)
    model = start if start is not None else Transformer(config)
    soft = {}
    if teacher is not None:
        soft = dict(
            distill_kind=distill["kind"], distill_temperature=distill["temperature"], distill_alpha=distill["alpha"]
        )
    run = TrainConfig(
        out_dir=out / (directory or f"{name}-{steps}-steps"),
        max_steps=steps,
        batch_size=8,
        lr=lr or LEARNING_RATES[name],
        warmup_steps=steps // 20,
        eval_every=0,
        save_every=0,
        progress=True,
        **soft,
    )
    split = int(len(ids) * 0.98)
    result = Trainer(
        model,
        TokenDataset(ids[:split], 256),
        run,
        val_data=TokenDataset(ids[split:], 256),
        tokenizer=tokenizer,
        teacher=teacher,
    ).train()
    final = result.evals[-1] if result.evals else {}
    print(f"{name}: val loss {final.get('val_loss', float('nan')):.3f} after {steps} steps", flush=True)
    return load_model(result.export_dir)


def target_samples(
    target: Transformer,
    ids: list[int],
    sequences: int,
    prompt_len: int = 32,
    new_tokens: int = 224,
    temperature: float = 1.0,
) -> list[int]:
    """Text sampled from the target (at `temperature`) after random windows of the training
    data: the corpus for distilling the draft."""
    rng = random.Random(0)
    prompts = [ids[s : s + prompt_len] for s in (rng.randrange(len(ids) - prompt_len) for _ in range(sequences))]
    packed = pack_for_cpu_inference(copy.deepcopy(target))
    samples: list[int] = []
    for i in range(0, sequences, 64):
        params = SamplingParams(temperature=temperature, max_new_tokens=new_tokens, seed=i)
        for prompt, out in zip(prompts[i : i + 64], generate(packed, prompts[i : i + 64], params, eos_token_ids=[])):
            samples += prompt + out.token_ids
    return samples


def distilled_draft_name(steps: int, distill: dict) -> str:
    """The distilled draft's directory, named by everything its training depends on. alpha 0
    (hard targets only) keeps the name the older, teacher-less distillation used: the same
    training exactly, so its cached draft stays in use."""
    data = "" if distill["data"] == "samples" else f"-on-{distill['data']}"
    if distill["data"] != "corpus" and distill["sample_temperature"] != 1.0:
        data += f"-samples-t{distill['sample_temperature']:g}"
    if distill["data"] != "corpus" and distill["sequences"] != 1024:
        data += f"-{distill['sequences']}-sequences"
    if distill["lr"] != LEARNING_RATES["distill"]:
        data += f"-lr{distill['lr']:g}"
    if distill["alpha"] == 0:
        return f"draft-distilled{data}-{steps}-steps"
    return f"draft-kd-{distill['kind']}-T{distill['temperature']:g}-alpha{distill['alpha']:g}{data}-{steps}-steps"


def cached_target_samples(
    cache: Path, target: Transformer, ids: list[int], sequences: int, temperature: float = 1.0, name: str = "target"
) -> list[int]:
    """`target_samples` (from `target`, or another model named by `name`), kept in `cache`
    (safetensors): every distillation setting trains on the same sampled text, which costs
    minutes to make."""
    suffix = "" if temperature == 1.0 else f"-t{temperature:g}"
    path = cache / f"{name}-samples-{sequences}-sequences{suffix}.safetensors"
    if path.exists():
        return load_file(path)["ids"].tolist()
    samples = target_samples(target, ids, sequences, temperature=temperature)
    with atomic_path(path) as temporary:
        save_file({"ids": torch.tensor(samples, dtype=torch.int32)}, str(temporary))
    return samples


def prepare(cache: Path, steps: dict[str, int], distill: dict | None = None) -> tuple[Path, Path]:
    """Train (or reuse) the pair: the target on the stdlib source; the draft on the same text,
    then distilled from the target on text the target samples (sequence-level knowledge
    distillation, Kim & Rush 2016) with the target as teacher: the draft learns the target's
    whole next-token distribution at every position (token-level knowledge distillation,
    Hinton et al. 2015; for speculative drafts, Zhou et al. 2024, "DistillSpec"), so that it
    predicts the target's tokens rather than the corpus's. `distill`: kind, temperature and
    alpha of the loss (default `DISTILL`)."""
    distill = dict(DISTILL, **(distill or {}))
    # Sizes, vocabulary, step counts and distillation settings name the directories: a cached
    # pair is only reused for the same training.
    cache = cache / f"vocab{VOCAB_SIZE}-target{SIZES['target']['num_layers']}x{SIZES['target']['hidden_size']}"
    target_dir = cache / f"target-{steps['target']}-steps" / "model"
    plain_draft_dir = cache / f"draft-{steps['draft']}-steps" / "model"
    draft_name = distilled_draft_name(steps["distill"], distill)
    draft_dir = cache / draft_name / "model"
    if target_dir.exists() and draft_dir.exists():
        return target_dir, draft_dir
    files = stdlib_files()
    training = files[: int(len(files) * 0.9)]
    cache.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = cache / "tokenizer"
    tokenizer = (
        Tokenizer.from_dir(tokenizer_dir) if tokenizer_dir.exists() else train_tokenizer(training, tokenizer_dir)
    )
    ids: list[int] = []
    for f in training:
        ids += tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
        ids.append(tokenizer.eos_token_id)
    print(f"training on {len(ids):,} tokens of stdlib source", flush=True)
    # Each stage is kept, so an interrupted preparation resumes at the stage it was in.
    target = load_model(target_dir) if target_dir.exists() else train("target", tokenizer, ids, cache, steps["target"])
    draft = (
        load_model(plain_draft_dir)
        if plain_draft_dir.exists()
        else train("draft", tokenizer, ids, cache, steps["draft"])
    )
    if distill["data"] == "corpus":
        samples = ids
    elif distill["data"] == "draft-samples":
        samples = cached_target_samples(
            cache,
            draft,
            ids,
            sequences=distill["sequences"],
            temperature=distill["sample_temperature"],
            name=f"draft-{steps['draft']}-steps",
        )
    else:
        samples = cached_target_samples(
            cache, target, ids, sequences=distill["sequences"], temperature=distill["sample_temperature"]
        )
        if distill["data"] == "both":
            samples = samples + ids
    # The teacher only runs forward, so it is packed for inference as generation packs it.
    teacher = pack_for_cpu_inference(copy.deepcopy(target)) if distill["alpha"] > 0 else None
    print(f"distilling the draft on {len(samples):,} tokens ({distill['data']}; {draft_name})", flush=True)
    train(
        "draft-distilled",
        tokenizer,
        samples,
        cache,
        steps["distill"],
        start=draft,
        lr=distill["lr"],
        teacher=teacher,
        distill=distill,
        directory=draft_name,
    )
    return target_dir, draft_dir


def held_out_prompts(tokenizer: Tokenizer, count: int, length: int) -> list[list[int]]:
    files = stdlib_files()
    held_out = files[int(len(files) * 0.9) :]
    prompts = []
    for f in held_out:
        ids = tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            break
    return prompts


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "speculative"), help="where the trained pair is kept")
    parser.add_argument("--target-steps", type=int, default=600)
    parser.add_argument("--draft-steps", type=int, default=600)
    parser.add_argument("--distill-steps", type=int, default=400)
    parser.add_argument(
        "--distill-kind",
        choices=DISTILLATION_KINDS,
        default=DISTILL["kind"],
        help="divergence between the target's and the draft's next-token distributions",
    )
    parser.add_argument("--distill-temperature", type=float, default=DISTILL["temperature"])
    parser.add_argument(
        "--distill-alpha",
        type=float,
        default=DISTILL["alpha"],
        help="share of the soft-target term in the draft's loss (0: hard targets only)",
    )
    parser.add_argument(
        "--distill-data",
        choices=DISTILL_DATA,
        default=DISTILL["data"],
        help="what the draft is distilled on: text sampled from the target, its training text, or both",
    )
    parser.add_argument(
        "--distill-sample-temperature",
        type=float,
        default=DISTILL["sample_temperature"],
        help="temperature of the target's samples the draft is distilled on",
    )
    parser.add_argument(
        "--distill-sequences",
        type=int,
        default=DISTILL["sequences"],
        help="how many sequences of 256 tokens are sampled to distill on",
    )
    parser.add_argument(
        "--distill-lr", type=float, default=DISTILL["lr"], help="peak learning rate of the distillation"
    )
    parser.add_argument(
        "--acceptance-only",
        action="store_true",
        help="print acceptance and tokens per target forward at each k, without timing anything",
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument(
        "--draft-confidence",
        type=float,
        default=0.05,
        help="for one extra run at the largest k: stop drafting below this draft probability "
        "(this small draft's median confidence is about that)",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over all prompts and systems")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "speculative"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if (
        min(args.distill_temperature, args.distill_sample_temperature, args.distill_lr, args.distill_sequences) <= 0
        or not 0 <= args.distill_alpha <= 1
    ):
        parser.error(
            "--distill-temperature, --distill-sample-temperature, --distill-lr and --distill-sequences "
            "must be > 0 and --distill-alpha in [0, 1]"
        )
    distill = {
        "kind": args.distill_kind,
        "temperature": args.distill_temperature,
        "alpha": args.distill_alpha,
        "data": args.distill_data,
        "sample_temperature": args.distill_sample_temperature,
        "lr": args.distill_lr,
        "sequences": args.distill_sequences,
    }
    target_dir, draft_dir = prepare(
        Path(args.cache),
        {"target": args.target_steps, "draft": args.draft_steps, "distill": args.distill_steps},
        distill,
    )
    tokenizer = Tokenizer.from_dir(target_dir)
    # Packed for CPU inference, as `genforge generate` loads them (genforge.inference).
    target, draft = (pack_for_cpu_inference(load_model(d).eval()) for d in (target_dir, draft_dir))
    if args.acceptance_only:
        return report_acceptance(
            target,
            draft,
            held_out_prompts(tokenizer, args.prompts, args.prompt_len),
            [int(k) for k in args.ks.split(",")],
            args,
            draft_dir,
        )
    hf_target = transformers.AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    hf_draft = transformers.AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    prompts = held_out_prompts(tokenizer, args.prompts, args.prompt_len)
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens)
    ks = [int(k) for k in args.ks.split(",")]

    def hf(prompt, **kwargs):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = hf_target.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                eos_token_id=None,
                pad_token_id=0,
                **kwargs,
            )
        return out[0, len(prompt) :].tolist()

    systems = {
        "genforge target alone": lambda p: (generate(target, [p], params, eos_token_ids=[])[0].token_ids, None),
        **{
            f"genforge speculative k={k}": (
                lambda p, k=k: _spec(
                    speculative_generate(target, draft, p, params, num_draft_tokens=k, eos_token_ids=[])
                )
            )
            for k in ks
        },
        f"genforge speculative k={max(ks)}, draft confidence {args.draft_confidence:g}": lambda p: _spec(
            speculative_generate(
                target,
                draft,
                p,
                params,
                num_draft_tokens=max(ks),
                draft_confidence=args.draft_confidence,
                eos_token_ids=[],
            )
        ),
        "genforge prompt lookup k=10": lambda p: _spec(prompt_lookup_generate(target, p, params, eos_token_ids=[])),
        "transformers target alone": lambda p: (hf(p), None),
        **{f"transformers assisted k={k}": (lambda p, k=k: (hf(p, assistant_model=hf_draft), None)) for k in ks},
        "transformers prompt lookup k=10": lambda p: (hf(p, prompt_lookup_num_tokens=10), None),
    }
    # Each repeat times every system on every prompt; the order of the systems flips every
    # repeat, so drifting machine speed does not always favour the same ones. Ratios are taken
    # within a repeat, then the median over repeats is reported with its range.
    totals = {name: [0.0] * args.repeats for name in systems}
    stats = {name: [] for name in systems}
    reference = {}
    for repeat in range(args.repeats):
        order = list(systems.items()) if repeat % 2 == 0 else list(systems.items())[::-1]
        for i, prompt in enumerate(prompts):
            for name, run in order:
                if name.startswith("transformers assisted"):
                    k = int(name.rsplit("=", 1)[1])
                    hf_draft.generation_config.num_assistant_tokens = k
                    hf_draft.generation_config.num_assistant_tokens_schedule = "constant"
                    hf_draft.generation_config.assistant_confidence_threshold = 0.0
                seconds, (tokens, stat) = timed(lambda run=run, prompt=prompt: run(prompt))
                totals[name][repeat] += seconds
                if stat and repeat == 0:
                    stats[name].append(stat)
                expected = reference.setdefault(i, tokens)
                if tokens != expected:
                    print(f"warning: {name} differs from the target's greedy output on prompt {i}", flush=True)
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)

    generated = args.new_tokens * len(prompts)
    rows = []
    for name in systems:
        base = totals[f"{name.split()[0]} target alone"]
        speedups = sorted(b / t for b, t in zip(base, totals[name]))
        entry = {
            "system": name,
            "tokens_per_s": generated / statistics.median(totals[name]),
            "speedup": statistics.median(speedups),
            "speedup_min": speedups[0],
            "speedup_max": speedups[-1],
            "seconds_per_repeat": totals[name],
        }
        if stats[name]:
            entry["acceptance_rate"] = statistics.mean(s["acceptance_rate"] for s in stats[name])
            entry["tokens_per_target_forward"] = statistics.mean(s["tokens_per_target_forward"] for s in stats[name])
        rows.append(entry)
    results = {
        "machine": describe(transformers=transformers.__version__),
        "setup": f"{len(prompts)} held-out stdlib prompts of {args.prompt_len} tokens, {args.new_tokens} greedy "
        f"tokens; target {SIZES['target']}, draft {SIZES['draft']}",
        "rows": rows,
    }
    machine = ", ".join(f"{k} {v}" for k, v in results["machine"].items())
    lines = [
        f"Machine: {machine}. {results['setup']}. Median of {args.repeats} repeats (speed-up range in brackets).",
        "",
        "| system | tokens/s | speedup over own target alone | acceptance | tokens per target forward |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}x "
            f"({r['speedup_min']:.2f}-{r['speedup_max']:.2f}) | {r.get('acceptance_rate', float('nan')):.2f} | "
            f"{r.get('tokens_per_target_forward', float('nan')):.2f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def report_acceptance(target, draft, prompts, ks, args, draft_dir: Path) -> int:
    """Acceptance rate and tokens per target forward of greedy speculative decoding at each k
    (and at the largest k with `--draft-confidence`), averaged over the prompts as the timed
    run averages them, and draft forwards per generated token (the other side of the cost);
    one JSON line."""
    params = SamplingParams(temperature=0, max_new_tokens=args.new_tokens)
    settings = [(k, None) for k in ks] + [(max(ks), args.draft_confidence)]
    row = {"draft": draft_dir.parent.name}
    for k, confidence in settings:
        runs = [
            speculative_generate(
                target,
                draft,
                p,
                params,
                num_draft_tokens=k,
                eos_token_ids=[],
                **({"draft_confidence": confidence} if confidence else {}),
            ).stats
            for p in prompts
        ]
        name = f"k={k}" + (f" confidence {confidence:g}" if confidence else "")
        row[name] = {
            "acceptance_rate": round(statistics.mean(s.acceptance_rate for s in runs), 4),
            "tokens_per_target_forward": round(statistics.mean(s.tokens_per_target_forward for s in runs), 4),
            "draft_forwards_per_token": round(sum(s.draft_forwards for s in runs) / sum(s.generated for s in runs), 4),
        }
    print(json.dumps(row), flush=True)
    return 0


def _spec(completion):
    s = completion.stats
    return completion.token_ids, {
        "acceptance_rate": s.acceptance_rate,
        "tokens_per_target_forward": s.tokens_per_target_forward,
    }


if __name__ == "__main__":
    sys.exit(main())
