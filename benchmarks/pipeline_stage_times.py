"""Run the pipeline once and print how long each stage took (from its manifest) and the whole wall time.

    python benchmarks/pipeline_stage_times.py --profile imagefolder \
        --set data.uri=../shared/datasets/cifar10-jpg.tar.gz --set train.epochs=1

Takes the same arguments as `kiln run`. Use a fresh store.root (the default is ./artifacts) or stages are reused
and show their original durations with status `reused`.
"""

from __future__ import annotations

import platform
import sys
import time
from datetime import date

import torch

from kiln.cli import build_parser
from kiln.config import load_config
from kiln.store import ArtifactStore


def main(argv: list[str]) -> None:
    from flows.training_pipeline import training_pipeline

    args = build_parser().parse_args(["run", *argv])
    config = load_config(args.profile, args.config, args.overrides)
    started = time.perf_counter()
    outputs = training_pipeline(config)
    wall = time.perf_counter() - started
    store = ArtifactStore(config.store.root)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'}, {torch.get_num_threads()} threads)"
    print(f"\n# kiln pipeline stage times — {date.today()} — {device}")
    print(f"# command: python benchmarks/pipeline_stage_times.py {' '.join(argv)}")
    print("| stage | status | seconds | key metrics |")
    print("|---|---|---|---|")
    for stage, ref in outputs.items():
        manifest = store.manifest(ref)
        shown = {k: v for k, v in manifest.metrics.items() if isinstance(v, (int, float, str, bool))}
        summary = ", ".join(f"{k}={v}" for k, v in list(shown.items())[:5])
        print(f"| {stage} | {'reused' if ref.reused else 'computed'} | {manifest.duration_s:.1f} | {summary} |")
    print(f"| **total wall** | | {wall:.1f} | including Prefect start-up |")


if __name__ == "__main__":
    main(sys.argv[1:])
