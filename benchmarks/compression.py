"""Every compression variant of one trained model, measured side by side, checked against the issue's targets.

    python benchmarks/compression.py --profile cifar10 --set store.root=/tmp/bench-store
    python benchmarks/compression.py --profile imagefolder --set data.uri=../shared/datasets/cifar10-jpg.tar.gz \\
        --set train.model=simple_cnn --set train.epochs=3 --set compress.distill_epochs=3

Takes the same arguments as `kiln run`. Runs download → augment → train → export → compress with the stage
functions (no Prefect, no validation), every stage reusing what the store already holds, so a second call with other
compress.* settings retrains nothing but the variants. All seven variants are built unless the command sets
compress.variants. Training, fine-tuning and distillation use the GPU when there is one; every ONNX variant is
timed on this machine's CPU with onnxruntime, interleaved, in one run.

Prints a markdown block for benchmarks/RESULTS.md: the device, the command, the report table, the targets (met or
missed, with the numbers), the policy's choice, and the fp32 model in PyTorch eager against onnxruntime (same
threads, interleaved).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from datetime import date
from types import SimpleNamespace

import numpy as np
import onnxruntime
import pandas as pd
import torch

from kiln.cli import build_parser
from kiln.config import load_config
from kiln.store import ArtifactStore, read_json

ALL_VARIANTS = (
    "compress.variants=[int8_static,int8_dynamic,fp16,prune_structured,prune_unstructured,distill,distill_int8]"
)
TABLE_COLUMNS = {  # report column -> header
    "variant": "variant", "accuracy": "accuracy", "agreement_with_fp32": "agree fp32", "size_bytes": "size",
    "gzip_size_bytes": "gzip", "params": "params", "zero_weight_fraction": "zeros", "macs": "MACs",
    "p50_ms": "p50 b1 ms", "p95_ms": "p95 b1 ms", "throughput_ips": "img/s b64", "throughput_vs_fp32": "vs fp32",
    "qualifies": "qualifies",
}  # fmt: skip


def main(argv: list[str]) -> None:
    from tasks.augment import augment
    from tasks.compress import DETAILS_FILE, REPORT_FILE, SELECTION_FILE, compress
    from tasks.download import download
    from tasks.export import export
    from tasks.train import train

    args = build_parser().parse_args(["run", *argv])
    explicit_variants = any(override.startswith("compress.variants=") for override in args.overrides)
    overrides = list(args.overrides) if explicit_variants else [ALL_VARIANTS, *args.overrides]
    config = load_config(args.profile, args.config, overrides)
    store = ArtifactStore(config.store.root)
    seconds: dict[str, float] = {}

    def timed(name, function, *arguments, **keywords):
        started = time.perf_counter()
        result = function(*arguments, **keywords)
        seconds[name] = round(time.perf_counter() - started, 1)
        print(f"{name}: {'reused' if result.reused else 'computed'} in {seconds[name]} s", file=sys.stderr)
        return result

    dataset = timed("download", download, config.data, store)
    policy = timed("augment", augment, config.augment, dataset, store)
    model = timed("train", train, config.train, dataset, policy, store)
    exported = timed("export", export, config.export, model, dataset, store)
    compressed = timed("compress", compress, config.compress, exported, dataset, store, model=model)

    out = store.materialize(compressed)
    rows = pd.read_csv(out / REPORT_FILE)
    selection = read_json(out / SELECTION_FILE)
    details = read_json(out / DETAILS_FILE)
    training = store.manifest(model).metrics
    test_samples = int(store.manifest(compressed).metrics["test_samples"])
    print(f"\n## Compression variants — {date.today()} — {device()}\n")
    print(f"- command: `python benchmarks/compression.py {' '.join(argv)}`")
    print(f"- teacher: `{training['model']}` ({training['parameters']:,} parameters), {training['epochs']} epoch(s) on "
          f"{training['device']} ({training['precision']}); {test_samples:,} test images")  # fmt: skip
    print(f"- stage seconds (this call; reused stages are near 0): {seconds}")
    print(f"- onnxruntime {onnxruntime.__version__} CPUExecutionProvider, torch {torch.__version__}\n")
    print(markdown_table(rows))
    print()
    for line in target_lines(rows, details):
        print(f"- {line}")
    print(f"- chosen (objective {selection['objective']}, budget {selection['max_accuracy_drop']}): "
          f"**{selection['chosen']}**. {selection['reason']}")  # fmt: skip
    print()
    print(eager_versus_onnxruntime(store, model, exported, dataset, config.compress))


class TorchSession:
    """A PyTorch module behind the two onnxruntime.InferenceSession methods kiln's timing calls."""

    def __init__(self, module: torch.nn.Module):
        self.module = module.eval()

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name="input")]

    def run(self, _outputs, feed: dict) -> list:
        with torch.inference_mode():
            return [self.module(torch.from_numpy(feed["input"])).numpy()]


def eager_versus_onnxruntime(store, model_ref, exported_ref, dataset_ref, compress_config) -> str:
    """The issue's "fp32 onnxruntime >= 1.5x torch eager" target: the trained model in PyTorch (CPU, fp32, eager,
    inference mode) and its fp32 ONNX file in onnxruntime, timed interleaved with the same threads and inputs."""
    from kiln.compression.measure import time_sessions
    from kiln.dataset import read_split
    from kiln.models import load_model
    from kiln.onnx_tools import ort_session
    from kiln.runtime.preprocess import Preprocessing
    from tasks.compress import THROUGHPUT_BATCH
    from tasks.export import MODEL_FILE, PREPROCESS_FILE

    threads = compress_config.timing_threads
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        module, _ = load_model(store.materialize(model_ref))
        export_dir = store.materialize(exported_ref)
        prep = Preprocessing.from_json(read_json(export_dir / PREPROCESS_FILE))
        images, _ = read_split(store.materialize(dataset_ref), "test")
        sample = prep.normalize(images[:1])
        batch = prep.normalize(np.resize(images, (THROUGHPUT_BATCH, *images.shape[1:])))
        sessions = {"torch eager": TorchSession(module), "onnxruntime": ort_session(export_dir / MODEL_FILE, threads)}
        timings = time_sessions(sessions, sample, batch, compress_config.latency_runs,
                                compress_config.throughput_seconds)  # fmt: skip
    finally:
        torch.set_num_threads(previous_threads)
    eager, ort = timings["torch eager"], timings["onnxruntime"]
    ratio = ort["throughput_ips"] / max(eager["throughput_ips"], 1e-9)
    verdict = "**met**" if ratio >= 1.5 else "**missed**"
    rows = [f"| {name} | {row['p50_ms']} | {row['p95_ms']} | {row['throughput_ips']:,.0f} |"
            for name, row in timings.items()]  # fmt: skip
    return "\n".join([
        f"The fp32 model in PyTorch and in onnxruntime, {threads or 'default'} thread(s), timed interleaved:",
        "",
        "| runtime | p50 b1 ms | p95 b1 ms | img/s b64 |",
        "|---|---|---|---|",
        *rows,
        "",
        f"- target fp32 onnxruntime ≥ 1.5x torch eager throughput: {verdict} ({ratio:.2f}x; batch 1: "
        f"{eager['p50_ms'] / max(ort['p50_ms'], 1e-9):.2f}x lower p50)",
    ])  # fmt: skip


def device() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()} for training" if torch.cuda.is_available() else ", no GPU"
    return f"{cpu}, {os.cpu_count()} logical CPUs{gpu}"


def markdown_table(rows: pd.DataFrame) -> str:
    shown = rows[list(TABLE_COLUMNS)].rename(columns=TABLE_COLUMNS)
    lines = ["| " + " | ".join(shown.columns) + " |", "|" + "---|" * len(shown.columns)]
    for record in shown.to_dict(orient="records"):
        cells = []
        for column, value in record.items():
            if column in ("size", "gzip"):
                cells.append(f"{value / 1e6:.2f} MB" if value >= 1e5 else f"{value / 1e3:.1f} kB")
            elif column in ("params", "MACs"):
                cells.append(f"{value:,}")
            elif column in ("accuracy", "agree fp32"):
                cells.append(f"{value:.4f}")
            elif column == "zeros":
                cells.append(f"{value:.0%}")
            elif column == "img/s b64":
                cells.append(f"{value:,.0f}")
            elif column == "vs fp32":
                cells.append(f"{value:.2f}x")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_lines(rows: pd.DataFrame, details: dict) -> list[str]:
    """The issue's three targets, each met or missed, with the measured numbers."""
    by_variant = rows.set_index("variant")
    lines = []

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**missed**"

    if "int8_static" in by_variant.index:
        row = by_variant.loc["int8_static"]
        ok = row["throughput_vs_fp32"] >= 2.0 and row["accuracy_drop"] <= 0.005
        lines.append(f"target int8 ≥ 2x fp32 throughput at ≤ 0.5 pt drop: {verdict(ok)} "
                     f"({row['throughput_vs_fp32']:.2f}x, drop {100 * row['accuracy_drop']:.2f} pt)")  # fmt: skip
    if "prune_structured" in by_variant.index:
        row = by_variant.loc["prune_structured"]
        ok = row["throughput_vs_fp32"] >= 1.5 and row["accuracy_drop"] <= 0.01
        lines.append(f"target structured pruning ≥ 1.5x throughput at ≤ 1 pt drop: {verdict(ok)} "
                     f"({row['throughput_vs_fp32']:.2f}x, drop {100 * row['accuracy_drop']:.2f} pt, "
                     f"MACs {row['macs'] / by_variant.loc['fp32', 'macs']:.2f}x fp32)")  # fmt: skip
    if "distill" in by_variant.index:
        row = by_variant.loc["distill"]
        ratio = details.get("distill", {}).get("params_ratio", row["params"] / by_variant.loc["fp32", "params"])
        ok = row["accuracy_drop"] <= 0.02 and ratio <= 0.25
        lines.append(f"target student within 2 pt of the teacher at ≤ 1/4 parameters: {verdict(ok)} "
                     f"(drop {100 * row['accuracy_drop']:.2f} pt at {ratio:.3f}x the parameters, "
                     f"{details.get('distill', {}).get('student', '?')})")  # fmt: skip
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])
