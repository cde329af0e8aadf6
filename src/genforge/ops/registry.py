"""The model registry: registered models, their numbered versions, aliases and lineage.

A registered model is a name (`chat-small`) with versions 1, 2, 3, ...; each version is a model
directory (genforge / Hugging Face format) or a PEFT adapter directory, frozen when registered,
with its lineage: the base model, the data files with their content hashes, the adapter, the
producing run (MLflow run id when it was tracked) and command, read from the run record the
training command left (`ops.lineage`), plus the SHA-256 of every file of the version. Aliases
(`champion`, `canary`, any name) point at one version each and move when re-pointed; the
references `registry:NAME@ALIAS`, `registry:NAME/VERSION` and `registry:NAME/latest` are accepted
wherever a model directory is (`resolve_model_ref`), so `genforge serve --model
registry:chat-small@champion` serves whatever the alias points at when the server starts.

Two stores with one set of rules, chosen by `$GENFORGE_REGISTRY` (or `--registry`):
- a tracking URI (`sqlite:///mlflow.db`, `http://mlflow:5000`, ...): MLflow's model registry,
  the version's files logged as artifacts of its run (the producing run when given), lineage as
  version tags;
- a folder (default `~/.genforge/registry`): `index.json`, rewritten atomically under a file
  lock, and one folder per version, `models/NAME/VERSION/`, a copy of the registered directory.
  Versions are copies rather than references to the run directories because a version must
  stay what was evaluated: a run directory is resumed (its `model/` rewritten), overwritten or
  deleted, and a registry that followed paths would then serve something no one tested. MLflow's
  registry copies into its artifact store for the same reason.
Alias names follow MLflow's rules in both stores: `latest` and `v<digits>` are reserved.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text, staged_directory
from .lineage import file_hashes, find_run_record
from .mlflow_store import local_artifact_root, require_mlflow, tracked_run_id

REF_PREFIX = "registry:"
REGISTRY_ENV = "GENFORGE_REGISTRY"
INDEX = "index.json"
REGISTRY_EXPERIMENT = "genforge-registry"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$")
_VERSION_LIKE = re.compile(r"^v\d+$", re.IGNORECASE)
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # scheme: (a Windows drive letter is one letter)


class RegistryError(ValueError):
    """A registry operation that cannot be done as asked: the message says what exists."""


def default_registry() -> str:
    """$GENFORGE_REGISTRY, else ~/.genforge/registry."""
    return os.environ.get(REGISTRY_ENV) or str(Path.home() / ".genforge" / "registry")


@dataclass
class ModelVersion:
    """One version of a registered model. `path`: its local directory (an MLflow version's is
    fetched by `resolve_model_version`)."""

    name: str
    version: int
    kind: str  # "model" or "adapter"
    created: str
    source: str  # the directory that was registered
    path: Path | None = None
    aliases: list[str] = field(default_factory=list)
    lineage: dict[str, Any] = field(default_factory=dict)
    description: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path) if self.path is not None else None
        return data


@dataclass
class RegisteredModel:
    name: str
    versions: list[int]
    aliases: dict[str, int]


# ------------------------------------------------------------------------------ references
def is_registry_ref(value: object) -> bool:
    return isinstance(value, str) and value.startswith(REF_PREFIX)


def parse_ref(ref: str) -> tuple[str, str | None, int | None]:
    """`registry:NAME@ALIAS` -> (NAME, ALIAS, None); `registry:NAME/VERSION` -> (NAME, None,
    VERSION); `registry:NAME/latest` -> (NAME, None, None)."""
    if not is_registry_ref(ref):
        raise RegistryError(f"{ref!r} is not a registry reference (registry:NAME@ALIAS or registry:NAME/VERSION)")
    body = ref[len(REF_PREFIX) :]
    if "@" in body:
        name, _, alias = body.partition("@")
        if _NAME.match(name) and _ALIAS.match(alias):
            return name, alias, None
    elif "/" in body:
        name, _, version = body.partition("/")
        if _NAME.match(name) and version == "latest":
            return name, None, None
        if _NAME.match(name) and version.isdigit() and int(version) > 0:
            return name, None, int(version)
    raise RegistryError(
        f"bad registry reference {ref!r}; accepted: registry:NAME@ALIAS (e.g. registry:chat@champion), "
        "registry:NAME/VERSION (e.g. registry:chat/3) or registry:NAME/latest"
    )


def open_registry(location: str | None = None):
    """The registry at `location` (default `default_registry()`): MLflow's for a URI, else a folder."""
    location = location or default_registry()
    if _URI.match(location) and not re.match(r"^[A-Za-z]:[\\/]", location):
        return MlflowRegistry(location)
    return DirectoryRegistry(location)


def resolve_model_version(ref: str, location: str | None = None) -> ModelVersion:
    """The version `ref` names, with `path` a local directory holding its files."""
    name, alias, version = parse_ref(ref)
    return open_registry(location).fetch(name, version=version, alias=alias)


def resolve_model_ref(ref: str | os.PathLike) -> Path:
    """A model (or adapter) directory from a path or a `registry:` reference (see the module
    doc). Plain paths come back unchanged, unchecked: their reader checks them."""
    if not is_registry_ref(ref):
        return Path(ref)
    return resolve_model_version(str(ref)).path


def model_dir_argument(value: str) -> str:
    """An argparse `type` for flags that take a model directory: `registry:` references resolved,
    their errors shown as the flag's."""
    import argparse

    try:
        return str(resolve_model_ref(value))
    except (RegistryError, OSError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


# --------------------------------------------------------------------------------- lineage
def registrable_directory(directory: str | Path) -> tuple[Path, str]:
    """(the directory to register, "model" or "adapter"): a model directory (config.json), a PEFT
    adapter directory (adapter_config.json), or a run directory holding one as `model/` or `adapter/`."""
    directory = Path(directory)
    if not directory.is_dir():
        raise RegistryError(f"{directory} is not a directory; register a model, adapter or run directory")
    for candidate in (directory, directory / "model", directory / "adapter"):
        if (candidate / "config.json").is_file():
            return candidate, "model"
        if (candidate / "adapter_config.json").is_file():
            return candidate, "adapter"
    raise RegistryError(
        f"{directory} is neither a model directory (config.json) nor an adapter directory (adapter_config.json), "
        "nor a run directory with model/ or adapter/ inside"
    )


def collect_lineage(directory: Path, kind: str, run_id: str | None = None) -> dict[str, Any]:
    """What produced `directory`: its run record's command, start model and data (with their
    content hashes), the adapter, the run id, and the SHA-256 of each of its files."""
    lineage: dict[str, Any] = {"source": str(directory.resolve()), "files": file_hashes(directory)}
    found = find_run_record([directory.parent, directory])
    record = found[1] if found else {}
    run_dir = found[0] if found else None
    flags = record.get("flags", {})
    start = record.get("start_model")
    if kind == "adapter":
        config = json.loads((directory / "adapter_config.json").read_text())
        lineage["adapter"] = str(directory.resolve())
        lineage["base_model"] = config.get("base_model_name_or_path") or (start or {}).get("path")
    elif start is not None and not (record.get("command", "").endswith("pretrain") and not flags.get("init_weights")):
        lineage["base_model"] = start.get("registry") or start.get("path")
    if start is not None and start.get("registry"):
        lineage["base_model_registry"] = start["registry"]
    if flags.get("adapter"):
        lineage.setdefault("adapter", flags["adapter"])
    if record:
        lineage["command"] = record.get("command")
        lineage["flags"] = flags
        lineage["data"] = record.get("data", [])
        lineage["run_dir"] = str(run_dir.resolve())
        for key in ("git_commit", "genforge_version"):
            if record.get(key):
                lineage[key] = record[key]
    lineage["run_id"] = (
        run_id or (record.get("mlflow") or {}).get("run_id") or (tracked_run_id(run_dir) if run_dir else None)
    )
    return lineage


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise RegistryError(
            f"bad model name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit"
        )


def check_alias(alias: str) -> None:
    """MLflow's alias rules, kept by both stores: a word of letters, digits, '_' and '-', not `latest` or `v<digits>`."""
    if not isinstance(alias, str) or not _ALIAS.match(alias):
        raise RegistryError(f"bad alias {alias!r}: use letters, digits, '_' and '-', starting with a letter")
    if alias.lower() == "latest" or _VERSION_LIKE.match(alias):
        raise RegistryError(f"the alias {alias!r} is reserved (latest and v<digits> name versions); choose another")


def _unknown_model(name: str, known: Iterable[str], where: str) -> RegistryError:
    known = sorted(known)
    return RegistryError(
        f"no registered model {name!r} in {where}; registered: {', '.join(known) if known else 'none yet'}"
    )


def _unknown_alias(name: str, alias: str, aliases: dict[str, int]) -> RegistryError:
    listed = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
    return RegistryError(f"model {name!r} has no alias {alias!r}; its aliases: {listed}")


def _unknown_version(name: str, version: int, versions: Iterable[int]) -> RegistryError:
    listed = ", ".join(str(v) for v in sorted(versions)) or "none"
    return RegistryError(f"model {name!r} has no version {version}; its versions: {listed}")


# ---------------------------------------------------------------------- directory registry
class DirectoryRegistry:
    """The registry in a folder (see the module doc)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.where = str(self.root)

    @property
    def index_path(self) -> Path:
        return self.root / INDEX

    def _read(self) -> dict[str, Any]:
        if not self.index_path.exists():
            return {"format": 1, "models": {}}
        try:
            index = json.loads(self.index_path.read_text())
        except json.JSONDecodeError as err:
            raise RegistryError(f"registry index {self.index_path} is corrupt ({err})") from None
        if not isinstance(index, dict) or not isinstance(index.get("models"), dict):
            raise RegistryError(f"registry index {self.index_path} is not a genforge registry index")
        return index

    def _write(self, index: dict[str, Any]) -> None:
        atomic_write_text(self.index_path, json.dumps(index, indent=2, sort_keys=True))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The index, read under an exclusive lock and written back when the block ends normally,
        so two commands registering at once both get their version."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            try:
                import fcntl
            except ImportError:  # not POSIX: no lock, still atomic writes
                fcntl = None
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            index = self._read()
            yield index
            self._write(index)

    def _model(self, index: dict[str, Any], name: str) -> dict[str, Any]:
        models = index["models"]
        if name not in models:
            raise _unknown_model(name, models, self.where)
        return models[name]

    def _version(self, name: str, entry: dict[str, Any], number: int) -> ModelVersion:
        data = entry["versions"][str(number)]
        aliases = sorted(a for a, v in entry["aliases"].items() if v == number)
        return ModelVersion(
            name=name,
            version=number,
            kind=data["kind"],
            created=data["created"],
            source=data["source"],
            path=self.root / "models" / name / str(number),
            aliases=aliases,
            lineage=data.get("lineage", {}),
            description=data.get("description"),
        )

    def list_models(self) -> list[RegisteredModel]:
        index = self._read()
        return [
            RegisteredModel(name, sorted(int(v) for v in entry["versions"]), dict(entry["aliases"]))
            for name, entry in sorted(index["models"].items())
        ]

    def versions(self, name: str) -> list[ModelVersion]:
        entry = self._model(self._read(), name)
        return [self._version(name, entry, int(v)) for v in sorted(entry["versions"], key=int)]

    def fetch(self, name: str, version: int | None = None, alias: str | None = None) -> ModelVersion:
        """The version by number, by alias, or the latest; its files are `path`."""
        _check_name(name)
        entry = self._model(self._read(), name)
        numbers = [int(v) for v in entry["versions"]]
        if alias is not None:
            if alias not in entry["aliases"]:
                raise _unknown_alias(name, alias, entry["aliases"])
            version = entry["aliases"][alias]
        elif version is None:
            version = max(numbers)
        if version not in numbers:
            raise _unknown_version(name, version, numbers)
        found = self._version(name, entry, version)
        if not found.path.is_dir():
            raise RegistryError(f"{name} version {version}: its files are missing from {found.path}")
        return found

    def register(
        self,
        name: str,
        directory: str | Path,
        run_id: str | None = None,
        aliases: Iterable[str] = (),
        description: str | None = None,
    ) -> ModelVersion:
        """Copy `directory` in as the next version of `name` (created when new), with its lineage."""
        _check_name(name)
        aliases = list(aliases)
        for alias in aliases:
            check_alias(alias)
        directory, kind = registrable_directory(directory)
        lineage = collect_lineage(directory, kind, run_id)
        with self._locked() as index:
            entry = index["models"].setdefault(name, {"created": _now(), "versions": {}, "aliases": {}})
            number = max((int(v) for v in entry["versions"]), default=0) + 1
            target = self.root / "models" / name / str(number)
            with staged_directory(target) as staging:
                shutil.copytree(directory, staging, dirs_exist_ok=True)
            entry["versions"][str(number)] = {
                "kind": kind,
                "created": _now(),
                "source": str(directory.resolve()),
                "lineage": lineage,
                "description": description,
            }
            for alias in aliases:
                entry["aliases"][alias] = number
        return self._version(name, entry, number)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        check_alias(alias)
        with self._locked() as index:
            entry = self._model(index, name)
            if str(version) not in entry["versions"]:
                raise _unknown_version(name, version, [int(v) for v in entry["versions"]])
            entry["aliases"][alias] = int(version)

    def delete_alias(self, name: str, alias: str) -> None:
        with self._locked() as index:
            entry = self._model(index, name)
            if alias not in entry["aliases"]:
                raise _unknown_alias(name, alias, entry["aliases"])
            del entry["aliases"][alias]


# ------------------------------------------------------------------------- MLflow registry
def _local_artifact_dir(source: str) -> Path | None:
    """The folder an artifact URI names when the artifact store is a local folder, else None."""
    local = source[len("file://") :] if source.startswith("file://") else source
    return Path(local) if not _URI.match(local) and Path(local).is_dir() else None


class MlflowRegistry:
    """The registry in MLflow's model registry at a tracking URI (see the module doc)."""

    def __init__(self, uri: str) -> None:
        require_mlflow(f"the registry at {uri} (MLflow's model registry)")
        from mlflow import MlflowClient

        self.uri = self.where = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def _exception(self):
        from mlflow.exceptions import MlflowException

        return MlflowException

    def _registered(self, name: str):
        _check_name(name)
        try:
            return self.client.get_registered_model(name)
        except self._exception() as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise _unknown_model(name, [m.name for m in self.client.search_registered_models()], self.uri) from None

    def _numbers(self, name: str) -> list[int]:
        return sorted(int(v.version) for v in self.client.search_model_versions(f"name='{name}'"))

    def _version(self, name: str, found, aliases: dict[str, int]) -> ModelVersion:
        tags = found.tags or {}
        number = int(found.version)
        return ModelVersion(
            name=name,
            version=number,
            kind=tags.get("genforge.kind", "model"),
            created=datetime.fromtimestamp(found.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
            source=found.source,
            path=None,
            aliases=sorted(a for a, v in aliases.items() if v == number),
            lineage=json.loads(tags.get("genforge.lineage", "{}")),
            description=found.description or None,
        )

    def list_models(self) -> list[RegisteredModel]:
        return [
            RegisteredModel(m.name, self._numbers(m.name), {a: int(v) for a, v in (m.aliases or {}).items()})
            for m in sorted(self.client.search_registered_models(), key=lambda m: m.name)
        ]

    def versions(self, name: str) -> list[ModelVersion]:
        model = self._registered(name)
        aliases = {a: int(v) for a, v in (model.aliases or {}).items()}
        return [self._version(name, self.client.get_model_version(name, str(n)), aliases) for n in self._numbers(name)]

    def fetch(self, name: str, version: int | None = None, alias: str | None = None) -> ModelVersion:
        """The version by number, by alias, or the latest, its files fetched to a local `path`
        (used in place when the artifact store is a local folder, else downloaded once)."""
        model = self._registered(name)
        aliases = {a: int(v) for a, v in (model.aliases or {}).items()}
        numbers = self._numbers(name)
        if alias is not None:
            if alias not in aliases:
                raise _unknown_alias(name, alias, aliases)
            version = aliases[alias]
        elif version is None:
            if not numbers:
                raise _unknown_version(name, 0, numbers)
            version = max(numbers)
        if version not in numbers:
            raise _unknown_version(name, version, numbers)
        found = self._version(name, self.client.get_model_version(name, str(version)), aliases)
        found.path = self._local_files(found)
        return found

    def _local_files(self, version: ModelVersion) -> Path:
        source = version.source
        local = _local_artifact_dir(source)
        if local is not None:
            return local
        import mlflow

        key = hashlib.sha256(f"{self.uri}\0{source}".encode()).hexdigest()[:16]
        target = Path.home() / ".cache" / "genforge" / "registry" / key / version.name / str(version.version)
        if not (target / ".complete").exists():
            with staged_directory(target) as staging:
                fetched = Path(
                    mlflow.artifacts.download_artifacts(
                        artifact_uri=source, dst_path=str(staging), tracking_uri=self.uri
                    )
                )
                if fetched != staging:  # MLflow fetches into staging/<last part of the source>
                    for child in list(fetched.iterdir()):
                        child.rename(staging / child.name)
                    fetched.rmdir()
                (staging / ".complete").write_text(source)
        return target

    def register(
        self,
        name: str,
        directory: str | Path,
        run_id: str | None = None,
        aliases: Iterable[str] = (),
        description: str | None = None,
    ) -> ModelVersion:
        """Log `directory` as artifacts (of the producing run when known, else of a registration
        run in the experiment genforge-registry) and create the next version from them."""
        _check_name(name)
        aliases = list(aliases)
        for alias in aliases:
            check_alias(alias)
        directory, kind = registrable_directory(directory)
        lineage = collect_lineage(directory, kind, run_id)
        run_id = lineage.get("run_id")
        if run_id is not None:
            try:
                self.client.get_run(run_id)
            except self._exception():
                raise RegistryError(f"--run-id {run_id}: no such MLflow run in {self.uri}") from None
            owner, artifact_path = run_id, f"registered/{name}"
        else:
            experiment = self.client.get_experiment_by_name(REGISTRY_EXPERIMENT)
            if experiment is None:
                root = local_artifact_root(self.uri)
                experiment_id = self.client.create_experiment(
                    REGISTRY_EXPERIMENT, artifact_location=f"{root}/{REGISTRY_EXPERIMENT}" if root else None
                )
            else:
                experiment_id = experiment.experiment_id
            owner = self.client.create_run(experiment_id, run_name=f"register {name}").info.run_id
            artifact_path = "model"
        self.client.log_artifacts(owner, str(directory), artifact_path=artifact_path)
        if run_id is None:
            self.client.set_terminated(owner)
        source = f"{self.client.get_run(owner).info.artifact_uri}/{artifact_path}"
        try:
            self.client.create_registered_model(name)
        except self._exception() as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {"genforge.kind": kind, "genforge.lineage": json.dumps(lineage)}
        created = self.client.create_model_version(
            name, source=source, run_id=run_id, tags=tags, description=description or ""
        )
        for alias in aliases:
            self.client.set_registered_model_alias(name, alias, created.version)
        return self.fetch(name, version=int(created.version))

    def set_alias(self, name: str, alias: str, version: int) -> None:
        check_alias(alias)
        self._registered(name)
        numbers = self._numbers(name)
        if version not in numbers:
            raise _unknown_version(name, version, numbers)
        self.client.set_registered_model_alias(name, alias, str(version))

    def delete_alias(self, name: str, alias: str) -> None:
        aliases = {a: int(v) for a, v in (self._registered(name).aliases or {}).items()}
        if alias not in aliases:
            raise _unknown_alias(name, alias, aliases)
        self.client.delete_registered_model_alias(name, alias)


__all__ = [
    "REF_PREFIX",
    "REGISTRY_ENV",
    "DirectoryRegistry",
    "MlflowRegistry",
    "ModelVersion",
    "RegisteredModel",
    "RegistryError",
    "check_alias",
    "collect_lineage",
    "default_registry",
    "is_registry_ref",
    "model_dir_argument",
    "open_registry",
    "parse_ref",
    "registrable_directory",
    "resolve_model_ref",
    "resolve_model_version",
]
