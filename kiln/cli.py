"""The `kiln` command: run the pipeline, predict with a bundle.

    kiln run [--profile quickstart] [--config FILE] [--set section.key=value ...]
    kiln predict BUNDLE IMAGE [IMAGE ...]
    kiln serve BUNDLE [--host 127.0.0.1] [--port 8080]
    kiln registry list|show|promote|rollback ...
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from kiln.config import PROFILE_NAMES
from kiln.errors import ConfigError, KilnError
from kiln.registry_cli import add_registry_parser, run_registry
from kiln.runtime.options import add_server_arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Train an image classifier from raw data to a deployable ONNX bundle with a Prefect pipeline.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the training pipeline flow (download → … → package) and print where the bundle is",
        description="Run the training pipeline. Config = profile, then --config file, then --set overrides. "
        "Stages whose inputs did not change are reused from the artifact store.",
    )
    run.add_argument("--profile", choices=PROFILE_NAMES, help="named starting config (default: quickstart)")
    run.add_argument("--config", type=Path, metavar="FILE", help="YAML file with sections data:, train:, ...")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one value, e.g. --set train.epochs=5 (repeatable)",
    )
    run.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")

    predict = commands.add_parser(
        "predict",
        help="print the predicted label and probability for each image, using only a bundle",
        description="Classify image files with a bundle folder or .tar.gz written by `kiln run`. "
        "Needs onnxruntime, numpy and pillow only.",
    )
    predict.add_argument("bundle", type=Path, help="bundle folder or .tar.gz")
    predict.add_argument("images", type=Path, nargs="+", help="image files (PNG, JPEG, ...)")
    predict.add_argument("--json", action="store_true", help="print one JSON object per image")

    serve = commands.add_parser(
        "serve",
        help="serve a bundle over HTTP (POST /v1/predict, GET /v1/metadata, GET /healthz)",
        description="Verify a bundle against its manifest, then serve it with FastAPI on uvicorn. Needs neither "
        "torch nor Prefect; inside a bundle, `python -m kiln_runtime.server .` does the same without kiln.",
    )
    serve.add_argument("bundle", type=Path, help="bundle folder or .tar.gz")
    add_server_arguments(serve)

    add_registry_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "registry":
            return run_registry(args)
        return _predict(args)
    except KilnError as error:
        print(f"kiln: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1


def _run(args: argparse.Namespace) -> int:
    from kiln.config import load_config

    config = load_config(args.profile, args.config, args.overrides)
    if args.show_config:
        print(config.model_dump_json(indent=2))
        return 0
    # Without PREFECT_API_URL, Prefect starts a temporary local server; its first start creates the database,
    # which can take longer than Prefect's 20 s default on a slow disk or a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # kiln runs offline by default; the temporary server's telemetry heartbeat only logs connection errors there.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.training_pipeline import training_pipeline  # imports Prefect and torch: only when running

    _hide_tracebacks_of_user_errors()
    from kiln.store import ArtifactStore
    from tasks.package import bundle_location

    outputs = training_pipeline(config)
    print("\nstage      status    output")
    for stage, ref in outputs.items():
        print(f"{stage:<10} {'reused' if ref.reused else 'computed':<9} {ref.uri}")
    bundle, archive = bundle_location(outputs["package"], ArtifactStore(config.store.root))
    print(f"\nBundle:  {bundle}")
    if archive:
        print(f"Archive: {archive}")
    if ArtifactStore(config.store.root).is_local:
        print(f"Try it:  kiln predict {bundle} IMAGE.png")
        print(f"Serve:   kiln serve {bundle} --port 8080")
    if config.package.registry:
        version = ArtifactStore(config.store.root).manifest(outputs["package"]).metrics["version"]
        print(f"Registry: {_registry_status(config, version)}")
    return 0


def _registry_status(config, version: str) -> str:
    """Which aliases point at `version` after the run, and the reason recorded when the alias moved there."""
    from kiln.registry import ModelRegistry, registry_root
    from kiln.store import ArtifactStore

    registry = ModelRegistry(registry_root(ArtifactStore(config.store.root)))
    name = config.package.model_name
    aliases = [alias for alias, target in registry.aliases(name).items() if target == version]
    moves = [move for move in registry.history(name) if move.get("to") == version]
    reason = f" ({moves[-1]['reason']})" if moves else ""
    return f"{name} {version} is {' and '.join(aliases) or 'registered without an alias'}{reason}"


class _MessageOnlyForKilnErrors(logging.Filter):
    """A KilnError already says what is wrong and what to do; Prefect would log it with a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KilnError):
            record.exc_info, record.exc_text = None, None
        return True


def _hide_tracebacks_of_user_errors() -> None:
    message_only = _MessageOnlyForKilnErrors()
    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(message_only)


def _predict(args: argparse.Namespace) -> int:
    from kiln.bundle import load_bundle

    missing = [str(path) for path in args.images if not path.is_file()]
    if missing:
        raise KilnError(f"image file(s) not found: {', '.join(missing)}")
    with tempfile.TemporaryDirectory(prefix="kiln-bundle-") as scratch:  # used only when BUNDLE is an archive
        predictions = load_bundle(args.bundle, extract_to=Path(scratch)).predict_files(args.images)
    for prediction in predictions:
        if args.json:
            print(json.dumps(prediction.__dict__))
        else:
            print(f"{prediction.source}\t{prediction.label}\t{prediction.probability:.4f}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from kiln.runtime.server import serve

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    serve(str(args.bundle), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
