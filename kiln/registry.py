"""A local model registry under the artifact store: immutable registered versions plus movable aliases.

Layout under `<store.root>/registry/`:

    <model>/versions/<version>/bundle/             a full copy of the bundle folder (verifies with load_bundle)
    <model>/versions/<version>/registration.json   when, with which metrics, on which dataset, from which output
    <model>/versions/.tmp-<version>-<id>/          a registration in progress (renamed into place when complete)
    <model>/aliases.json                           {"production": "<version>", "staging": "<version>"}
    <model>/history.jsonl                          one line per alias move: at, alias, from, to, reason, actor
    <model>/.lock                                  flock'ed while aliases.json and history.jsonl are changed

A version never changes once registered; only aliases move. Every alias move is logged in history.jsonl, which is
what `rollback` reads. No torch or Prefect here: the `kiln registry` commands run with the bundle runtime alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from kiln.bundle import MANIFEST_FILE, load_bundle
from kiln.errors import BundleError, ConfigError, KilnError
from kiln.store import ArtifactRef, ArtifactStore

REGISTRY_DIR = "registry"
BUNDLE_DIR = "bundle"
REGISTRATION_FILE = "registration.json"
ALIASES_FILE = "aliases.json"
HISTORY_FILE = "history.jsonl"
LOCK_FILE = ".lock"
# A fixed set, so that a typo (`--alias prod`) is an error instead of a new alias nothing deploys from.
ALIASES = ("production", "staging")
# The same patterns as package.model_name / package.version: names are used as folder names, never as paths.
_MODEL_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
ACCURACY_EPSILON = 1e-9  # accuracies are k/n fractions: float rounding must not flip an exact-budget tie

Alias = Literal["production", "staging"]


class AliasConflict(KilnError):
    """An alias moved between reading it and a move that depended on it (another run promoted meanwhile)."""


def registry_root(store: ArtifactStore) -> Path:
    """`<store.root>/registry` for a local store. Raises ConfigError for a remote one (flock needs a local disk)."""
    if not store.is_local:
        raise ConfigError(
            f"the model registry needs a local store.root, but it is {store.url!r}: set store.root to a local path "
            f"or turn the registry off with --set package.registry=false"
        )
    return Path(store.root) / REGISTRY_DIR


def production_version(store: ArtifactStore, model_name: str) -> ModelVersion | None:
    """The version `production` points to in the store's registry, or None (no registry, model or alias)."""
    if not store.is_local:
        return None
    registry = ModelRegistry(registry_root(store))
    if model_name not in registry.models() or "production" not in registry.aliases(model_name):
        return None
    return registry.get(model_name, "production")


def trained_on(store: ArtifactStore, version: ModelVersion) -> ArtifactRef | None:
    """The download output `version` was trained and evaluated on, if the store still holds it."""
    key = version.registration.get("dataset", {}).get("key", "")
    return store.lookup("download", key) if key else None


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: its bundle copy, its registration record and the aliases pointing at it."""

    name: str
    version: str
    path: Path  # the bundle folder: pass it to `kiln predict` or load_bundle
    registration: dict[str, Any] = field(hash=False, compare=False)
    aliases: tuple[str, ...] = ()

    @property
    def registered_at(self) -> str:
        return str(self.registration.get("registered_at", ""))


class ModelRegistry:
    """Reads and changes the registry under `root`. Holds no state besides the root."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # --- reading ----------------------------------------------------------------------------------------------
    def models(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(entry.name for entry in self.root.iterdir() if (entry / "versions").is_dir())

    def versions(self, model_name: str) -> list[ModelVersion]:
        """Every registered version of `model_name`, oldest registration first. Raises KilnError for an unknown model."""
        self._check_model_known(model_name)
        versions_dir = self._model_dir(model_name) / "versions"
        aliases = self.aliases(model_name)
        found = [
            self._read_version(model_name, entry.name, aliases)
            for entry in versions_dir.iterdir()
            if not entry.name.startswith(".") and (entry / REGISTRATION_FILE).is_file()
        ]
        return sorted(found, key=lambda version: (version.registered_at, version.version))

    def get(self, model_name: str, version_or_alias: str) -> ModelVersion:
        """The version named, or the one an alias points to. Raises KilnError listing what exists."""
        self._check_model_known(model_name)
        aliases = self.aliases(model_name)
        version = aliases.get(version_or_alias, version_or_alias)
        if _VERSION.match(version) and (self._version_dir(model_name, version) / REGISTRATION_FILE).is_file():
            return self._read_version(model_name, version, aliases)
        known = ", ".join(entry.version for entry in self.versions(model_name)) or "none"
        set_aliases = ", ".join(f"{alias} -> {target}" for alias, target in sorted(aliases.items())) or "none set"
        raise KilnError(
            f"{model_name} has no version or alias {version_or_alias!r}; versions: {known}; aliases: {set_aliases}. "
            f"See them with `kiln registry show {model_name}`"
        )

    def aliases(self, model_name: str) -> dict[str, str]:
        """{alias: version}; empty when no alias was ever set."""
        path = self._model_dir(model_name) / ALIASES_FILE
        if not path.is_file():
            return {}
        try:
            aliases = json.loads(path.read_text())
        except ValueError as error:
            raise KilnError(
                f"{path} is not valid JSON ({error}); restore it from the last lines of {HISTORY_FILE} beside it"
            ) from None
        return {str(alias): str(version) for alias, version in aliases.items()}

    def history(self, model_name: str) -> list[dict[str, Any]]:
        """Every alias move of `model_name`, oldest first."""
        path = self._model_dir(model_name) / HISTORY_FILE
        if not path.is_file():
            return []
        moves = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                moves.append(json.loads(line))
            except ValueError:
                raise KilnError(
                    f"{path} line {number} is not valid JSON (a write cut short?): repair or delete that line"
                ) from None
        return moves

    # --- registering ------------------------------------------------------------------------------------------
    def register(
        self, model_name: str, version: str, bundle_dir: Path, registration: Mapping[str, Any]
    ) -> ModelVersion:
        """Copy `bundle_dir` in as `version` of `model_name`, with its registration record.

        Idempotent: the same version with the same bundle content returns the version already registered (and its
        original record). Raises BundleError when `version` is registered with different content.
        """
        _check_name(model_name, version)
        if version in ALIASES:
            raise ConfigError(f"version {version!r} would be ambiguous with the alias of that name; choose another")
        versions_dir = self._model_dir(model_name) / "versions"
        versions_dir.mkdir(parents=True, exist_ok=True)
        final = versions_dir / version
        if final.exists():
            return self._existing(model_name, version, bundle_dir)
        # Built beside its final place, then renamed: readers see a whole version or none.
        work = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=versions_dir))
        work.chmod(0o755)  # mkdtemp makes it private; registered versions are read by whoever serves them
        try:
            shutil.copytree(bundle_dir, work / BUNDLE_DIR)
            load_bundle(work / BUNDLE_DIR)  # the copy itself must verify and load before it is registered
            record = {
                **registration,
                "model_name": model_name,
                "version": version,
                "registered_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
            }
            (work / REGISTRATION_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
            try:
                os.rename(work, final)
            except OSError:
                if not final.exists():
                    raise
                # A concurrent registration of the same version won; ours is discarded below.
                return self._existing(model_name, version, bundle_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return self._read_version(model_name, version, self.aliases(model_name))

    def _existing(self, model_name: str, version: str, bundle_dir: Path) -> ModelVersion:
        registered = self._read_version(model_name, version, self.aliases(model_name))
        if _manifest_files(registered.path) != _manifest_files(bundle_dir):
            raise BundleError(
                f"{model_name} version {version} is already registered with different bundle content "
                f"({registered.path}); versions are immutable: package under a new package.version"
            )
        return registered

    # --- moving aliases ---------------------------------------------------------------------------------------
    def set_alias(
        self,
        model_name: str,
        alias: str,
        version: str,
        reason: str,
        actor: str = "kiln",
        expect: Mapping[str, str | None] | None = None,
    ) -> ModelVersion:
        """Point `alias` at `version` and log the move in history.jsonl; no-op when it already points there.

        `expect` makes the move conditional ({alias: version or None}, checked under the lock): a decision taken
        against a production version that another run has moved since raises AliasConflict instead of landing.
        """
        _check_alias(alias)
        with self._locked(model_name):
            current = self.aliases(model_name)
            moved = {name: current.get(name) for name, wanted in (expect or {}).items() if current.get(name) != wanted}
            if moved:
                raise AliasConflict(
                    f"{model_name}: {', '.join(f'{name} is now {value}' for name, value in moved.items())}, not "
                    f"what the decision to move {alias} to {version} was based on; decide again"
                )
            target = self.get(model_name, version)  # by version or by another alias (e.g. promote staging)
            self._move(model_name, alias, target.version, reason, actor)
        return self.get(model_name, target.version)

    def promote(
        self, model_name: str, version: str, reason: str, alias: str = "production", actor: str = "kiln"
    ) -> ModelVersion:
        return self.set_alias(model_name, alias, version, reason, actor)

    def rollback(
        self, model_name: str, alias: str = "production", reason: str = "rollback", actor: str = "kiln"
    ) -> ModelVersion:
        """Move `alias` back to where it pointed before its last move (so a second rollback undoes the first)."""
        _check_alias(alias)
        with self._locked(model_name):
            moves = [move for move in self.history(model_name) if move["alias"] == alias]
            current = self.aliases(model_name).get(alias)
            if not moves or moves[-1]["from"] is None:
                raise KilnError(
                    f"{model_name} {alias} has no earlier version to roll back to (current: {current or 'none'}); "
                    f"pick one with `kiln registry promote {model_name} VERSION --alias {alias}`"
                )
            last = moves[-1]
            if last["to"] != current:
                raise KilnError(
                    f"{model_name} {alias} points to {current}, but its last logged move was to {last['to']}: the "
                    f"history is incomplete, so a rollback target cannot be trusted; "
                    f"choose a version with `kiln registry promote {model_name} VERSION --alias {alias}`"
                )
            self._move(model_name, alias, self.get(model_name, last["from"]).version, reason, actor)
        return self.get(model_name, last["from"])

    def _move(self, model_name: str, alias: str, version: str, reason: str, actor: str) -> None:
        """Called with the lock held: replace aliases.json, then append the move to history.jsonl."""
        aliases = self.aliases(model_name)
        previous = aliases.get(alias)
        if previous == version:
            return  # not a move: logging it would make `rollback` return to the same version
        aliases[alias] = version
        model_dir = self._model_dir(model_name)
        _write_json_atomically(model_dir / ALIASES_FILE, aliases)
        # aliases.json is what deployments read, so it changes first; history.jsonl is its log. A crash between the
        # two leaves an unlogged move, which `rollback` detects (the last logged move no longer matches).
        move = {"at": _now(), "alias": alias, "from": previous, "to": version, "reason": reason, "actor": actor}
        with open(model_dir / HISTORY_FILE, "a") as handle:
            handle.write(json.dumps(move, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    @contextmanager
    def _locked(self, model_name: str) -> Iterator[None]:
        """Hold an exclusive flock on `<model>/.lock`, so concurrent promoters take turns instead of losing moves."""
        self._check_model_known(model_name)
        with open(self._model_dir(model_name) / LOCK_FILE, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    # --- paths ------------------------------------------------------------------------------------------------
    def _model_dir(self, model_name: str) -> Path:
        _check_name(model_name)
        return self.root / model_name

    def _version_dir(self, model_name: str, version: str) -> Path:
        return self._model_dir(model_name) / "versions" / version

    def _check_model_known(self, model_name: str) -> None:
        if not (self._model_dir(model_name) / "versions").is_dir():
            known = ", ".join(self.models()) or "none"
            raise KilnError(
                f"no model {model_name!r} in the registry {self.root} (registered models: {known}); "
                f"check --store and the name with `kiln registry list`"
            )

    def _read_version(self, model_name: str, version: str, aliases: Mapping[str, str]) -> ModelVersion:
        directory = self._version_dir(model_name, version)
        try:
            registration = json.loads((directory / REGISTRATION_FILE).read_text())
        except (OSError, ValueError) as error:
            raise KilnError(
                f"cannot read {directory / REGISTRATION_FILE}: {error}; the registration is damaged: restore it "
                f"or remove {directory} and register the bundle again"
            ) from None
        pointing = tuple(sorted(alias for alias, target in aliases.items() if target == version))
        return ModelVersion(model_name, version, directory / BUNDLE_DIR, registration, pointing)


# --- the promotion decision -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChampionResult:
    """The current production version, scored on the challenger's test set, or why it could not be."""

    version: str
    accuracy: float | None = None
    problem: str | None = None  # set when it cannot be compared (different classes, failed verification, ...)

    @property
    def comparable(self) -> bool:
        return self.problem is None and self.accuracy is not None


@dataclass(frozen=True)
class Decision:
    alias: Alias
    reason: str


def decide_promotion(
    challenger_accuracy: float, blessed: bool, champion: ChampionResult | None, max_regression: float
) -> Decision:
    """Which alias a new version gets: production unless the gate failed, the champion cannot be compared, or the
    challenger is worse than the champion by more than `max_regression`."""
    if not blessed:
        return Decision("staging", "the evaluation gate failed (not blessed): it must not replace production")
    if champion is None:
        return Decision("production", f"first version: no production yet (test accuracy {challenger_accuracy:.4f})")
    if not champion.comparable:
        return Decision(
            "staging",
            f"production {champion.version} cannot be compared: {champion.problem}; "
            f"promote by hand with `kiln registry promote` if this version should replace it",
        )
    assert champion.accuracy is not None
    scores = (
        f"test accuracy {challenger_accuracy:.4f} vs production {champion.version}'s {champion.accuracy:.4f}, "
        f"regression budget {max_regression:.4f}"
    )
    if challenger_accuracy < champion.accuracy - max_regression - ACCURACY_EPSILON:
        return Decision("staging", f"worse than production beyond the budget: {scores}")
    return Decision("production", f"within the budget of production: {scores}")


# --- helpers --------------------------------------------------------------------------------------------------
def _check_name(model_name: str, version: str | None = None) -> None:
    if not _MODEL_NAME.match(model_name):
        raise ConfigError(f"model name {model_name!r} is invalid: use lowercase letters, digits, '.', '_' and '-'")
    if version is not None and not _VERSION.match(version):
        raise ConfigError(f"version {version!r} is invalid: use letters, digits, '.', '_', '+' and '-'")


def _check_alias(alias: str) -> None:
    if alias not in ALIASES:
        raise ConfigError(f"unknown alias {alias!r}; choose one of: {', '.join(ALIASES)}")


def _manifest_files(bundle_dir: Path) -> list[tuple[str, str]]:
    """(path, sha256) of every file the bundle's manifest lists: its content, without its creation time."""
    try:
        manifest = json.loads((Path(bundle_dir) / MANIFEST_FILE).read_text())
        return sorted((entry["path"], entry["sha256"]) for entry in manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise BundleError(f"{bundle_dir} has no readable {MANIFEST_FILE} ({error}): not a kiln bundle") from None


def _write_json_atomically(path: Path, value: Any) -> None:
    """Write to a temp file beside `path`, fsync it, then os.replace: readers see the old or the new file."""
    handle = tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}-", delete=False)
    try:
        with handle:
            handle.write(json.dumps(value, indent=2, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o644)  # NamedTemporaryFile makes it private; aliases are read by deployments
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
