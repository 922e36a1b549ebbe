"""`kiln registry`: list, inspect, promote and roll back the versions in the model registry (kiln/registry.py).

    kiln registry list [--json]
    kiln registry show NAME [VERSION_OR_ALIAS] [--json]
    kiln registry promote NAME VERSION [--alias production] [--reason TEXT]
    kiln registry rollback NAME [--alias production] [--reason TEXT]

Every sub-command takes --store PATH (default: artifacts), the store.root the pipeline ran with. Errors are
KilnErrors, printed by kiln.cli as `kiln: error: ...`. No torch or Prefect imports: this is a bundle-runtime tool.
"""

from __future__ import annotations

import argparse
import getpass
import json
from typing import Any

from kiln.registry import ALIASES, ModelRegistry, ModelVersion, registry_root
from kiln.store import ArtifactStore


def add_registry_parser(commands: Any) -> argparse.ArgumentParser:
    """Add `registry` and its sub-commands to `commands` (the object argparse's add_subparsers returned)."""
    registry = commands.add_parser(
        "registry",
        help="list, inspect, promote and roll back registered model versions",
        description="The model registry under <store>/registry: every packaged version, and the production and "
        "staging aliases the pipeline moves (or you move by hand).",
    )
    actions = registry.add_subparsers(dest="registry_command", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="every registered model with its version count and aliases")
    _common(listing, json_output=True)

    show = actions.add_parser("show", help="a model's versions and alias history, or one version's record")
    show.add_argument("name", help="model name (package.model_name)")
    show.add_argument("version", nargs="?", metavar="VERSION_OR_ALIAS", help="e.g. production or a version")
    _common(show, json_output=True)

    promote = actions.add_parser("promote", help="point an alias (default: production) at a version")
    promote.add_argument("name", help="model name (package.model_name)")
    promote.add_argument("version", metavar="VERSION", help="a version, or an alias to copy (e.g. staging)")
    promote.add_argument("--alias", choices=ALIASES, default="production", help="which alias to move")
    promote.add_argument("--reason", default="promoted by hand", help="recorded in the alias history")
    _common(promote)

    rollback = actions.add_parser("rollback", help="move an alias back to where it pointed before its last move")
    rollback.add_argument("name", help="model name (package.model_name)")
    rollback.add_argument("--alias", choices=ALIASES, default="production", help="which alias to move back")
    rollback.add_argument("--reason", default="rolled back by hand", help="recorded in the alias history")
    _common(rollback)
    return registry


def _common(parser: argparse.ArgumentParser, json_output: bool = False) -> None:
    parser.add_argument("--store", default="artifacts", metavar="PATH", help="the store.root (default: artifacts)")
    if json_output:
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run_registry(args: argparse.Namespace) -> int:
    """Run the `kiln registry` sub-command parsed into `args`; raises KilnError on a user-fixable problem."""
    registry = ModelRegistry(registry_root(ArtifactStore(args.store)))
    if args.registry_command == "list":
        return _list(registry, args.json)
    if args.registry_command == "show":
        return _show(registry, args.name, args.version, args.json)
    before = registry.aliases(args.name).get(args.alias)  # for the message only: the move itself is locked
    if args.registry_command == "promote":
        moved = registry.promote(args.name, args.version, args.reason, alias=args.alias, actor=_actor())
    else:
        moved = registry.rollback(args.name, alias=args.alias, reason=args.reason, actor=_actor())
    if before == moved.version:
        print(f"{args.name} {args.alias} already points to {moved.version}; nothing moved")
    else:
        print(f"{args.name} {args.alias}: {before or 'none'} -> {moved.version} ({args.reason})")
        print(f"bundle: {moved.path}")
    return 0


def _list(registry: ModelRegistry, as_json: bool) -> int:
    rows = [
        {"model": name, "versions": len(registry.versions(name)), "aliases": registry.aliases(name)}
        for name in registry.models()
    ]
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no models registered in {registry.root}")
    else:
        print(_table(
            ["model", "versions", *ALIASES],
            [[row["model"], row["versions"], *(row["aliases"].get(alias, "-") for alias in ALIASES)] for row in rows],
        ))  # fmt: skip
    return 0


def _show(registry: ModelRegistry, name: str, version: str | None, as_json: bool) -> int:
    if version is not None:
        chosen = registry.get(name, version)
        if as_json:
            print(json.dumps(_version_json(chosen), indent=2, default=str))
        else:
            print(_version_text(chosen))
        return 0
    versions = registry.versions(name)
    history = registry.history(name)
    if as_json:
        print(json.dumps({
            "model": name,
            "aliases": registry.aliases(name),
            "versions": [_version_json(entry) for entry in versions],
            "history": history,
        }, indent=2, default=str))  # fmt: skip
        return 0
    print(_table(
        ["version", "registered_at", "test_accuracy", "blessed", "aliases"],
        [[entry.version, entry.registered_at, _accuracy(entry), entry.registration.get("blessed", "?"),
          ", ".join(entry.aliases) or "-"] for entry in versions],
    ))  # fmt: skip
    if history:
        print("\nalias history (latest last):")
        for move in history[-10:]:
            print(f"  {move['at']}  {move['alias']}: {move['from'] or 'none'} -> {move['to']}  "
                  f"by {move['actor']}: {move['reason']}")  # fmt: skip
    return 0


def _version_json(entry: ModelVersion) -> dict[str, Any]:
    return {"model": entry.name, "version": entry.version, "path": str(entry.path), "aliases": list(entry.aliases),
            "registration": entry.registration}  # fmt: skip


def _version_text(entry: ModelVersion) -> str:
    registration = entry.registration
    lines = [
        f"model:          {entry.name}",
        f"version:        {entry.version}",
        f"aliases:        {', '.join(entry.aliases) or '-'}",
        f"registered_at:  {entry.registered_at}",
        f"test accuracy:  {_accuracy(entry)}",
        f"blessed:        {registration.get('blessed', '?')}",
        f"dataset digest: {registration.get('dataset', {}).get('digest', '?')}",
        f"source:         {registration.get('source', {}).get('uri', '?')}",
        f"bundle:         {entry.path}",
    ]
    return "\n".join(lines)


def _accuracy(entry: ModelVersion) -> str:
    value = entry.registration.get("metrics", {}).get("test_accuracy")
    return "?" if value is None else f"{value:.4f}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *[[str(value) for value in row] for row in rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in cells)


def _actor() -> str:
    try:
        return f"kiln registry ({getpass.getuser()})"
    except (KeyError, OSError):  # no user name in this environment (e.g. some containers)
        return "kiln registry"
