"""`genforge registry list|register|alias|show`, registered by `genforge.cli`: the model registry
(`genforge.ops.registry`) from the command line. Each parses, calls the registry, prints."""

from __future__ import annotations

import argparse
import json

from ..console import console


def _registry(args):
    from .registry import open_registry

    return open_registry(args.registry)


def cmd_list(args) -> int:
    models = _registry(args).list_models()
    if args.json:
        print(json.dumps([{"name": m.name, "versions": m.versions, "aliases": m.aliases} for m in models], indent=2))
        return 0
    if not models:
        console.print(f"[dim]no registered models in {_registry(args).where}[/dim]")
        return 0
    print("| model | versions | latest | aliases |\n|---|---:|---:|---|")
    for model in models:
        aliases = ", ".join(f"{a} -> {v}" for a, v in sorted(model.aliases.items()))
        print(f"| {model.name} | {len(model.versions)} | {max(model.versions)} | {aliases} |")
    return 0


def cmd_register(args) -> int:
    registry = _registry(args)
    version = registry.register(
        args.name, args.directory, run_id=args.run_id, aliases=args.alias, description=args.description
    )
    lineage = version.lineage
    base = lineage.get("base_model") or "-"
    data = ", ".join(f"{d['path']} ({d['sha256'][:12]})" for d in lineage.get("data", [])) or "-"
    aliases = f", aliases {', '.join(version.aliases)}" if version.aliases else ""
    console.print(
        f"registered {version.kind} {args.name} version {version.version}{aliases} in {registry.where}; "
        f"base model {base}; data {data}; run {lineage.get('run_id') or '-'}"
    )
    print(f"registry:{version.name}/{version.version}")
    return 0


def cmd_alias(args) -> int:
    registry = _registry(args)
    if args.delete:
        if args.version is not None:
            raise ValueError("--delete takes NAME ALIAS without a version")
        registry.delete_alias(args.name, args.alias)
        console.print(f"removed alias {args.alias} of {args.name}")
        return 0
    if args.version is None:
        raise ValueError(f"give the version {args.alias!r} should point at: genforge registry alias NAME ALIAS VERSION")
    registry.set_alias(args.name, args.alias, args.version)
    console.print(f"{args.name}@{args.alias} -> version {args.version}")
    return 0


def cmd_show(args) -> int:
    from .registry import REF_PREFIX, parse_ref

    target = args.model if args.model.startswith(REF_PREFIX) else REF_PREFIX + args.model
    registry = _registry(args)
    if "@" in target or "/" in target:
        name, alias, version = parse_ref(target)
        shown = [registry.fetch(name, version=version, alias=alias)]
    else:
        shown = registry.versions(target[len(REF_PREFIX) :])
    print(json.dumps([version.to_json() for version in shown], indent=2, default=str))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `genforge registry` and its subcommands to the top-level parser."""
    parser = sub.add_parser(
        "registry",
        help="the model registry: versions, aliases (champion, canary) and lineage",
        description="Registered models with numbered versions, aliases and lineage (base model, data with content "
        "hashes, adapter, producing run and command), in a folder or MLflow's model registry. Wherever a model "
        "directory is taken, registry:NAME@ALIAS or registry:NAME/VERSION names one (see docs/operations.md).",
        epilog="example: genforge registry register chat runs/sft --alias champion && "
        "genforge serve --model registry:chat@champion",
    )
    commands = parser.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")

    def child(name: str, help: str, func) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        command.add_argument(
            "--registry",
            default=None,
            metavar="DIR_OR_URI",
            help="a registry folder, or an MLflow tracking URI for MLflow's model registry "
            "(default: $GENFORGE_REGISTRY, else ~/.genforge/registry)",
        )
        command.set_defaults(func=func)
        return command

    listing = child("list", "list registered models, their versions and aliases", cmd_list)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")

    register = child("register", "register a model or adapter directory as the next version of NAME", cmd_register)
    register.add_argument("name", help="the registered model's name (created on first use)")
    register.add_argument(
        "directory",
        help="a model directory (config.json + safetensors), a PEFT adapter directory, or a run directory "
        "(genforge pretrain/finetune/align --out) whose model/ or adapter/ is registered with the run's lineage",
    )
    register.add_argument(
        "--run-id", default=None, help="the MLflow run that produced it (default: the run the run directory recorded)"
    )
    register.add_argument(
        "--alias", action="append", default=[], help="point this alias at the new version (repeatable)"
    )
    register.add_argument("--description", default=None, help="a note kept with the version")

    alias = child("alias", "point an alias (champion, canary, any name) at a version, or remove it", cmd_alias)
    alias.add_argument("name", help="registered model name")
    alias.add_argument("alias", help="alias name (latest and v<digits> are reserved)")
    alias.add_argument("version", type=int, nargs="?", default=None, help="the version it points at")
    alias.add_argument("--delete", action="store_true", help="remove the alias instead")

    show = child("show", "show a model's versions, or one version, with lineage, as JSON", cmd_show)
    show.add_argument("model", help="NAME (every version), NAME/VERSION, NAME/latest or NAME@ALIAS")


__all__ = ["add_commands", "cmd_alias", "cmd_list", "cmd_register", "cmd_show"]
