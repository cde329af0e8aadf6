"""Model cards (Mitchell et al. 2019, "Model Cards for Model Reporting") in the Hugging Face
format: a README.md whose YAML front matter (`huggingface_hub.ModelCardData`, evaluation
results as `model-index`) the Hub reads, and whose body says what the model is, what it was
trained on, how it measured, and what it should and should not be used for.

Facts come from the files genforge writes; nothing is invented. From the model directory:
`config.json` (architecture) and the safetensors headers (parameter count, no weights loaded).
From the run directory (the model directory's parent by default, where `genforge pretrain`,
`finetune` and `align` leave them): `metrics.jsonl` (steps, tokens, last losses),
`finetune.json`, `meta.json` of prepared data; evaluation results (`results.json` of `genforge
eval harness`), bias (`bias.json` of `genforge safety bias --out`), red-teaming (`redteam.json`)
and privacy figures (`privacy.json` or `mia.json`) wherever they lie in either directory.
Intended use and limitations are template text marked for the author to edit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


class ModelCardError(ValueError):
    """A directory that is not a model, or a record that cannot be read."""


EDIT_ME = "<!-- EDIT: replace this paragraph -->"


def parameter_count(model_dir: Path) -> int:
    """Parameters in the safetensors file(s), from their headers (shapes) alone."""
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelCardError(f"{model_dir} has no .safetensors weights to count")
    total = 0
    for path in files:
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelCardError(f"{path} could not be read as JSON: {err}") from err


def _find(directories: list[Path], name: str) -> Path | None:
    for directory in directories:
        if (directory / name).is_file():
            return directory / name
    return None


def training_summary(metrics_path: Path) -> dict[str, Any]:
    """Steps, tokens seen, and the last training and validation losses from a metrics.jsonl."""
    steps, tokens, last_loss, last_eval = 0, 0, None, None
    for number, line in enumerate(metrics_path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ModelCardError(f"{metrics_path}:{number} is not JSON: {err}") from err
        steps = max(steps, int(record.get("step", 0)))
        if "loss" in record:
            last_loss = record["loss"]
            tokens += int(record.get("tokens", 0))
        if "val_loss" in record:
            last_eval = record
    summary: dict[str, Any] = {"steps": steps, "tokens": tokens, "final_train_loss": last_loss}
    if last_eval is not None:
        summary["final_val_loss"] = last_eval["val_loss"]
        summary["final_val_ppl"] = last_eval.get("val_ppl")
    return summary


def _numbers(data: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON object, as dotted keys (lists skipped: per-item details)."""
    out: dict[str, float] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out |= _numbers(value, f"{prefix}{key}.")
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        out[prefix[:-1]] = data
    return out


def collect_records(model_dir: str | Path, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Everything the card states, gathered from the model and run directories."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelCardError(f"{model_dir} is not a model directory (no config.json)")
    config = _read_json(config_path)
    run_dir = Path(run_dir) if run_dir is not None else model_dir.parent
    places = [model_dir, run_dir]
    records: dict[str, Any] = {"name": model_dir.resolve().name if model_dir.name in ("model", "") else model_dir.name}
    records["config"] = config
    records["parameters"] = parameter_count(model_dir)
    metrics = _find(places, "metrics.jsonl")
    if metrics:
        records["training"] = training_summary(metrics) | {"source": str(metrics)}
    for key, name in (("finetune", "finetune.json"), ("data", "meta.json"), ("redteam", "redteam.json")):
        path = _find(places, name)
        if path:
            records[key] = _read_json(path)
    results = _find(places, "results.json") or _find([p / "eval" for p in places], "results.json")
    if results:
        records["evaluation"] = _read_json(results)
    bias = _find(places, "bias.json")
    if bias:
        records["bias"] = _read_json(bias)
    privacy = _find(places, "privacy.json") or _find(places, "mia.json")
    if privacy:
        records["privacy"] = _numbers(_read_json(privacy))
    return records


def _eval_results(evaluation: dict[str, Any]):
    from huggingface_hub import EvalResult

    results = []
    for task, result in evaluation.items():
        metrics = result.get("metrics", {}) if isinstance(result, dict) else {}
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                results.append(
                    EvalResult(
                        task_type="text-generation",
                        dataset_type=task,
                        dataset_name=task,
                        metric_type=metric,
                        metric_value=float(value),
                    )
                )
    return results


def build_model_card(
    model_dir: str | Path,
    *,
    run_dir: str | Path | None = None,
    license: str = "other",
    language: str | None = "en",
    base_model: str | None = None,
) -> str:
    """The README.md text: YAML metadata and a body from `collect_records`."""
    from huggingface_hub import ModelCardData

    records = collect_records(model_dir, run_dir)
    config = records["config"]
    name = records["name"]
    evaluation = records.get("evaluation") or {}
    eval_results = _eval_results(evaluation) if isinstance(evaluation, dict) else []
    causal = config.get("model_type") not in ("bert", "roberta", "distilbert")
    data = ModelCardData(
        language=language,
        license=license,
        library_name="genforge",
        pipeline_tag="text-generation" if causal else "feature-extraction",
        tags=["genforge", config.get("model_type", "transformer")],
        base_model=base_model,
        model_name=name,
        eval_results=eval_results or None,
    )
    body = [f"# {name}", "", f"{EDIT_ME}\nA one-paragraph summary: what the model is and who made it.", ""]

    body += ["## Architecture and size", "", "| | |", "|---|---|"]
    body.append(f"| parameters | {records['parameters']:,} |")
    for key in (
        "model_type",
        "architectures",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "max_position_embeddings",
        "dtype",
        "torch_dtype",
    ):
        if key in config:
            value = ", ".join(config[key]) if isinstance(config[key], list) else config[key]
            body.append(f"| {key} | {value} |")
    body.append("")

    body += ["## Training", ""]
    training, finetune, prepared = records.get("training"), records.get("finetune"), records.get("data")
    if training:
        body.append(f"- steps: {training['steps']:,}; tokens seen: {training['tokens']:,}")
        if training.get("final_train_loss") is not None:
            body.append(f"- final training loss: {training['final_train_loss']:.4f}")
        if training.get("final_val_loss") is not None:
            ppl = training.get("final_val_ppl")
            body.append(
                f"- final validation loss: {training['final_val_loss']:.4f}"
                + (f" (perplexity {ppl:.2f})" if ppl else "")
            )
    if finetune:
        body.append(
            f"- fine-tuning: method {finetune.get('method')}, {finetune.get('train_examples')} training examples, "
            f"{finetune.get('steps')} steps; held-out loss {finetune.get('val_loss_before')} -> "
            f"{finetune.get('val_loss_after')}"
        )
    if prepared:
        summary = {k: v for k, v in prepared.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        body.append(f"- prepared data (meta.json): {json.dumps(summary)[:500]}")
    if not (training or finetune or prepared):
        body.append("No training records were found beside the model.")
    body += ["", f"{EDIT_ME}\nTraining data: its sources, licences, languages, and how it was filtered.", ""]

    body += ["## Evaluation", ""]
    if eval_results:
        body += ["| task | metric | value |", "|---|---|---|"]
        body += [f"| {r.dataset_name} | {r.metric_type} | {r.metric_value:.4f} |" for r in eval_results]
    else:
        body.append("No evaluation results (results.json from `genforge eval harness --out`) were found.")
    body.append("")

    body += ["## Bias, safety and privacy", ""]
    bias = records.get("bias")
    if bias and isinstance(bias.get("tests"), dict):
        body += [
            f"Association tests ({bias.get('kind', 'seat').upper()}, `genforge safety bias`): effect size d and "
            "permutation p.",
            "",
            "| test | d | p |",
            "|---|---|---|",
        ]
        for key, test in bias["tests"].items():
            body.append(f"| {test.get('name', key)} | {test['effect_size']:.2f} | {test['p_value']:.1e} |")
        body.append("")
    elif bias:
        body += [f"Bias measurement: {json.dumps(_numbers(bias))[:500]}", ""]
    redteam = records.get("redteam")
    if redteam and "attack_success_rate" in redteam:
        body.append(
            f"Red-teaming (`genforge safety redteam`): attack success rate {redteam['attack_success_rate']:.1%} over "
            f"{redteam.get('num_attacks')} attacks."
        )
        body.append("")
    if records.get("privacy"):
        body += ["Privacy figures:", ""] + [f"- {k}: {v}" for k, v in records["privacy"].items()] + [""]
    if not (bias or redteam or records.get("privacy")):
        body += ["No bias, red-teaming or privacy measurements were found beside the model.", ""]

    body += [
        "## Intended use",
        "",
        f"{EDIT_ME}\nWhat the model is for, and who should use it.",
        "",
        "## Out-of-scope use and limitations",
        "",
        f"{EDIT_ME}\nUses it is not suited to; known failure modes; languages and domains it was not trained "
        "on. Language models can state falsehoods fluently and reproduce biases of their training data.",
        "",
        "## How to use",
        "",
        "```bash",
        "genforge chat --model DIR" if causal else "genforge rag index --encoder DIR ...",
        "```",
        "",
        "*Generated by `genforge model-card`; numbers come from the run's files, text marked EDIT is for the author.*",
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def write_model_card(model_dir: str | Path, out: str | Path | None = None, **options: Any) -> Path:
    """Write the card (default: README.md in the model directory) atomically; its path."""
    from ..atomic import atomic_write_text

    path = Path(out) if out is not None else Path(model_dir) / "README.md"
    atomic_write_text(path, build_model_card(model_dir, **options))
    return path


__all__ = [
    "ModelCardError",
    "build_model_card",
    "collect_records",
    "parameter_count",
    "training_summary",
    "write_model_card",
]
