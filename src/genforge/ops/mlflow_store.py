"""Where MLflow keeps runs: the store a command tracks to, and the check that MLflow is installed.

MLflow is the `genforge[ops]` extra; whatever needs it asks `require_mlflow` first, which turns
its absence into one line naming the extra. Without a tracking URI genforge uses
`$MLFLOW_TRACKING_URI`, else a SQLite store in ./mlruns (MLflow 3 keeps its plain-file store in
maintenance mode), with artifacts beside the database. A tracked run directory names its MLflow
run in `mlflow_run.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

INSTALL_HINT = "pip install 'genforge[ops]'"
TRACKING_FILE = "mlflow_run.json"
DEFAULT_STORE_DIR = "mlruns"


class TrackingError(ValueError):
    """Tracking that cannot start as asked (MLflow missing, a resumed run in another store)."""


def require_mlflow(purpose: str = "experiment tracking (--track)"):
    """The mlflow module, or a TrackingError naming the extra that installs it."""
    try:
        import mlflow
    except ImportError:
        raise TrackingError(f"{purpose} needs MLflow, which is not installed: {INSTALL_HINT}") from None
    return mlflow


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store in ./mlruns (an absolute URI)."""
    configured = os.environ.get("MLFLOW_TRACKING_URI")
    if configured:
        return configured
    return "sqlite:///" + str((Path.cwd() / DEFAULT_STORE_DIR / "mlflow.db").resolve())


def local_artifact_root(uri: str) -> str | None:
    """Where a local SQLite store keeps artifacts: `artifacts/` beside the database file (MLflow's
    own default, ./mlruns of whatever directory a command runs in, scatters them). None for
    other stores, whose server decides."""
    if not uri.startswith("sqlite:///"):
        return None
    return str(Path(uri[len("sqlite:///") :]).resolve().parent / "artifacts")


def tracked_run_id(run_dir: str | Path) -> str | None:
    """The MLflow run id a tracked run directory recorded (None when untracked)."""
    path = Path(run_dir) / TRACKING_FILE
    try:
        return json.loads(path.read_text())["run_id"]
    except (OSError, KeyError, json.JSONDecodeError):
        return None


__all__ = [
    "DEFAULT_STORE_DIR",
    "INSTALL_HINT",
    "TRACKING_FILE",
    "TrackingError",
    "default_tracking_uri",
    "local_artifact_root",
    "require_mlflow",
    "tracked_run_id",
]
