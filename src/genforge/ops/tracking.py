"""Experiment tracking through MLflow: `--track [URI]` on pretrain, finetune, align and eval.

A tracked command is one MLflow run. Its parameters are the command's flags (flattened); its
metrics are the records the training loop writes to metrics.jsonl (loss, lr, grad_norm,
tokens_per_s, val_loss, an alignment method's own), logged live with their step through the
`ops.hooks` seam, or an evaluation's results; its artifacts are the loss curve, the run's
config (`genforge_run.json`, see `ops.lineage`) and summary files, metrics.jsonl and the
resulting model or adapter directory; its tags are the genforge version and git commit and the
command. The run id is kept in the run directory (`mlflow_run.json`), so `--resume --track`
continues the same MLflow run, its metric histories going on from the checkpoint's step.

The store is any MLflow tracking URI (a tracking server, a database); without one,
`$MLFLOW_TRACKING_URI` or a SQLite store in `./mlruns/` (`mlflow ui --backend-store-uri
sqlite:///mlruns/mlflow.db` shows it). MLflow is the `genforge[ops]` extra: without it `--track`
stops with one line saying how to install it, before any work. Under torchrun only rank 0
logs. A store that fails during training is reported once and training goes on.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..console import console
from .hooks import metric_listener
from .lineage import RUN_RECORD, data_inputs, genforge_version, git_commit, plain_flags, write_run_record
from .mlflow_store import (
    DEFAULT_STORE_DIR,
    INSTALL_HINT,
    TRACKING_FILE,
    TrackingError,
    default_tracking_uri,
    local_artifact_root,
    require_mlflow,
    tracked_run_id,
)
from .registry import REF_PREFIX, resolve_model_version

DEFAULT_EXPERIMENT = "genforge"
# MLflow's limits: a parameter value's length, and params / metrics per log_batch call.
_PARAM_VALUE_LIMIT = 6000
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000
# Files of a run directory that are neither logged as artifacts nor worth a copy: the
# checkpoints (the registry and the model artifact carry the result) and the tracking pointer.
_SKIPPED_DIRS = ("checkpoints",)
_SKIPPED_FILES = (TRACKING_FILE,)


def flatten_params(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow parameters: dotted keys, JSON for lists, None left out."""
    params: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if value is None or callable(value):
            continue
        if isinstance(value, Mapping):
            params |= flatten_params(value, prefix=f"{name}.")
            continue
        text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
        params[name] = text[:_PARAM_VALUE_LIMIT]
    return params


def metric_values(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metrics record, keyed by MLflow-valid names ("step" is the x-axis, not a metric)."""
    values = {}
    for key, value in record.items():
        if key == "step" or not isinstance(value, (int, float)):
            continue
        values[re.sub(r"[^\w\-./ ]", "_", str(key))] = float(value)
    return values


class TrackedRun:
    """One MLflow run, written through an `MlflowClient` (no global active run, so several can
    be open in one process, as tests do)."""

    def __init__(self, client, run_id: str, tracking_uri: str, resumed: bool) -> None:
        self.client, self.run_id, self.tracking_uri, self.resumed = client, run_id, tracking_uri, resumed
        self._failed = False

    @classmethod
    def start(
        cls,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        resume_run_id: str | None = None,
    ) -> TrackedRun:
        """A new run in `experiment` (created when absent), or the run `resume_run_id` set running again."""
        require_mlflow()
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if resume_run_id is not None:
            try:
                client.get_run(resume_run_id)
            except MlflowException as err:
                raise TrackingError(
                    f"cannot continue MLflow run {resume_run_id} in {tracking_uri}: {err.message}; "
                    f"remove {TRACKING_FILE} from the run directory to track the rest as a new run"
                ) from None
            client.update_run(resume_run_id, status="RUNNING")
            if tags:
                client.log_batch(resume_run_id, tags=_tags(tags))
            return cls(client, resume_run_id, tracking_uri, resumed=True)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            root = local_artifact_root(tracking_uri)
            location = f"{root}/{experiment}" if root else None
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
        return cls(client, run.info.run_id, tracking_uri, resumed=False)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log `params`. MLflow keeps a parameter's first value; a resumed run's changed flags
        (more --steps, --resume) go to the tag genforge.resumed_flags instead."""
        params = dict(params)
        if self.resumed:
            logged = self.client.get_run(self.run_id).data.params
            changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
            params = {k: v for k, v in params.items() if k not in logged}
            if changed:
                self.client.set_tag(self.run_id, "genforge.resumed_flags", json.dumps(changed)[:_PARAM_VALUE_LIMIT])
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for start in range(0, len(items), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _PARAMS_PER_BATCH])

    def log_record(self, record: Mapping[str, Any]) -> None:
        """Log one metrics record at its step (results without a step at step 0). A store that
        fails is reported once; training is worth more than its log."""
        if self._failed:
            return
        from mlflow.entities import Metric

        step = int(record.get("step", 0))
        stamp = int(time.time() * 1000)
        metrics = [Metric(k, v, stamp, step) for k, v in metric_values(record).items() if not math.isnan(v)]
        try:
            for start in range(0, len(metrics), _METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[start : start + _METRICS_PER_BATCH])
        except Exception as err:  # any store error (HTTP, database): report, keep training
            self._failed = True
            console.print(
                f"[yellow]MLflow logging failed ({type(err).__name__}: {err}); the run goes on untracked, "
                "metrics.jsonl still has every step[/yellow]"
            )

    def log_artifacts_of(self, run_dir: Path) -> list[str]:
        """Log the run directory's files (plots, config, summaries, metrics.jsonl) and its model or
        adapter directories; the checkpoints stay out. Returns the artifact paths logged."""
        logged = []
        for path in sorted(run_dir.iterdir()):
            if path.is_file() and path.name not in _SKIPPED_FILES and not path.name.startswith("."):
                self.client.log_artifact(self.run_id, str(path))
                logged.append(path.name)
            elif path.is_dir() and path.name not in _SKIPPED_DIRS and _is_model_dir(path):
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
                logged.append(path.name + "/")
        return logged

    def log_file(self, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def _tags(tags: Mapping[str, str]):
    from mlflow.entities import RunTag

    return [RunTag(k, v) for k, v in tags.items()]


def add_tracking_arguments(parser, resumable: bool = True) -> None:
    """--track [URI] and --experiment NAME (`resumable`: the command continues runs with --resume)."""
    group = parser.add_argument_group(f"experiment tracking (MLflow; {INSTALL_HINT})")
    group.add_argument(
        "--track",
        nargs="?",
        const="",
        default=None,
        metavar="URI",
        help="log this run to MLflow: parameters, per-step metrics, the loss curve, config and resulting model; "
        "URI: any tracking URI (http://host:5000, sqlite:///mlflow.db); without one $MLFLOW_TRACKING_URI or "
        f"a SQLite store in ./{DEFAULT_STORE_DIR}/"
        + (". With --resume the same MLflow run continues" if resumable else ""),
    )
    group.add_argument(
        "--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment of the run (default {DEFAULT_EXPERIMENT})"
    )


def enable_tracking(parser, run_dir_flag: str | None = "out") -> None:
    """Give `parser`'s command --track and --experiment, and wrap its handler (set already with
    `set_defaults(func=...)`) so that it runs tracked when asked. `run_dir_flag`: the flag
    naming the run directory, where the lineage record and the tracking pointer are kept and
    whose outputs are logged; None for a command without one (eval)."""
    command = parser.get_default("func")
    if command is None:
        raise TypeError(f"{parser.prog}: set the command's func before enable_tracking")
    add_tracking_arguments(parser, resumable=run_dir_flag is not None)
    prog = parser.prog

    @functools.wraps(command)  # `inspect.unwrap(args.func)` is the command itself
    def tracked_command(args) -> int:
        return run_command(command, prog, run_dir_flag, args)

    parser.set_defaults(func=tracked_command)


def run_command(command: Callable[[Any], int], prog: str, run_dir_flag: str | None, args) -> int:
    """Run `command(args)`; with a run directory, leave its lineage record there on success;
    with --track, as one MLflow run (see the module doc)."""
    start_model = _resolve_start_model(args)
    flags = plain_flags(vars(args))
    run_dir = Path(getattr(args, run_dir_flag)) if run_dir_flag else None
    record = None
    if run_dir is not None:
        record = {
            "command": prog,
            "flags": flags,
            "start_model": start_model,
            "data": data_inputs(flags),
            "genforge_version": genforge_version(),
            "git_commit": git_commit(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    tracking = getattr(args, "track", None)
    if tracking is None or os.environ.get("RANK", "0") != "0":  # untracked, or not torchrun's rank 0
        code = command(args)
        if record is not None and code == 0 and run_dir.is_dir() and os.environ.get("RANK", "0") == "0":
            write_run_record(run_dir, record)
        return code
    require_mlflow()  # before any work
    run = _open_tracked_run(tracking, args, prog, run_dir, flags, start_model)
    status, code = "FAILED", 1
    try:
        with metric_listener(run.log_record):
            code = command(args)
        status = "FINISHED" if code == 0 else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            if status == "FINISHED":
                _log_outputs(run, args, run_dir, record)
        finally:
            run.finish(status)
    console.print(f"[dim]tracked as MLflow run {run.run_id} in {run.tracking_uri}[/dim]")
    return code


def _resolve_start_model(args) -> dict[str, Any] | None:
    """The model a training command starts from, with `registry:` references resolved in place
    (so the command reads a directory) and kept for the lineage."""
    value = getattr(args, "model", None)
    if not isinstance(value, str):
        return None
    if value.startswith(REF_PREFIX):
        version = resolve_model_version(value)
        args.model = str(version.path)
        return {"path": str(version.path), "registry": f"{version.name}/{version.version}", "ref": value}
    return {"path": str(Path(value).resolve())}


def _open_tracked_run(
    tracking: str, args, prog: str, run_dir: Path | None, flags: dict, start_model: dict | None
) -> TrackedRun:
    stored = None
    pointer = run_dir / TRACKING_FILE if run_dir is not None else None
    if pointer is not None and getattr(args, "resume", False) and pointer.is_file():
        stored = json.loads(pointer.read_text())
        if tracking and tracking != stored["tracking_uri"]:
            raise TrackingError(
                f"this run was tracked in {stored['tracking_uri']} (MLflow run {stored['run_id']}); resume it with "
                f"--track {stored['tracking_uri']}, or plain --track"
            )
    uri = stored["tracking_uri"] if stored else (tracking or default_tracking_uri())
    tags = {"genforge.version": genforge_version(), "genforge.command": prog}
    if start_model is not None and start_model.get("registry"):
        tags["genforge.start_model"] = f"registry:{start_model['registry']}"  # the version a reference named
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if run_dir is not None:
        tags["genforge.run_dir"] = str(run_dir.resolve())
    name = run_dir.name if run_dir is not None else prog.removeprefix("genforge ").replace(" ", "-")
    run = TrackedRun.start(
        uri, args.experiment, run_name=name, tags=tags, resume_run_id=stored["run_id"] if stored else None
    )
    run.log_params(flatten_params({k: v for k, v in flags.items() if k not in ("track", "experiment")}))
    if pointer is not None and not stored:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            pointer, json.dumps({"run_id": run.run_id, "tracking_uri": uri, "experiment": args.experiment}, indent=2)
        )
    return run


def _log_outputs(run: TrackedRun, args, run_dir: Path | None, record: dict | None) -> None:
    if run_dir is not None and run_dir.is_dir():
        if record is not None:
            record["mlflow"] = {"run_id": run.run_id, "tracking_uri": run.tracking_uri}
            write_run_record(run_dir, record)
        run.log_artifacts_of(run_dir)
        return
    out = getattr(args, "out", None)  # an evaluation's report file or folder
    if isinstance(out, str) and Path(out).exists():
        run.log_file(Path(out))


__all__ = [
    "DEFAULT_EXPERIMENT",
    "INSTALL_HINT",
    "RUN_RECORD",
    "TRACKING_FILE",
    "TrackedRun",
    "TrackingError",
    "add_tracking_arguments",
    "default_tracking_uri",
    "enable_tracking",
    "flatten_params",
    "metric_values",
    "require_mlflow",
    "run_command",
    "tracked_run_id",
]
