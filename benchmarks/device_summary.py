"""A compact summary of the JSON reports `benchmarks/train_speed.py --json-out` wrote into one folder.

    python benchmarks/device_summary.py device-out

`benchmarks/device_checks.sh run` prints it last, so the figures survive in a short tail of the call's output: the
device tool returns only the end of a command's output and a few of its files. TTA combinations: see
train_speed.py's tta_variants (kiln_probs is evaluate.tta=flip_translate, airbench_logits_wtd is airbench's TTA,
diagonals_probs all ten views of shifted_views).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import fit_trace  # benchmarks/, the script's own folder, as is sweep_choice
from sweep_choice import best_settings

SUMMARY_TRACE_ROWS = 8  # of each trace's operators: the summary must fit the tail the device tool returns
WALLS = (("stage_wall_seconds", "train stage"), ("fit_wall_seconds", "fit"))
VARIANTS = ("kiln_probs", "kiln_logits_wtd", "airbench_probs", "airbench_logits_wtd", "diagonals_probs")


def main(folder: Path) -> None:
    reports = sorted(folder.glob("*.json"), key=lambda path: path.stat().st_mtime)  # in the order they were written
    if not reports:
        raise SystemExit(f"no .json reports in {folder}")
    first = json.loads(reports[0].read_text())
    print(f"# summary of {len(reports)} report(s): {first.get('device')}, {first.get('date')}")
    for path in reports:
        report = json.loads(path.read_text())
        print(f"\n## {path.stem}: --set {' '.join(report.get('overrides', [])) or '(none)'}")
        if report.get("host"):
            host, after = report["host"], report.get("host_after", {})
            print(f"host: {host['cpus']} CPUs ({host['cpu_model']}), load average {host['load_average'][0]} at the "
                  f"start, {after.get('load_average', ['?'])[0]} at the end")  # fmt: skip
        if report.get("sweep"):
            print_sweep(path, report["sweep"])
        if report.get("feed"):
            feed = report["feed"]
            print(f"feed: {feed['model']} batch {feed['batch']} {feed['precision']}, bare "
                  f"{feed['bare_images_per_s']:,.0f} img/s, train stage {feed['stage_images_per_s']:,.0f} img/s "
                  f"({feed['data_path']}): ratio {feed['ratio']:.3f}")  # fmt: skip
        fit = report.get("fit_seconds")
        if fit:
            print(f"--fit-seconds {fit['seconds']}: {fit['probe_epoch_seconds']} s an epoch in the probe, "
                  f"{fit['epochs']} epochs")  # fmt: skip
        for recipe in report.get("recipe", []):
            print_recipe(recipe, fit["seconds"] if fit and recipe["epochs"] == fit["epochs"] else None)
        counters = report.get("compile_counters") or {}
        if any(counters.values()):
            print(f"compile: {counters.get('graphs')} graph(s), {counters.get('graph_breaks')} graph break(s), "
                  f"{counters.get('cudagraph_skips')} CUDA-graph skip(s)")  # fmt: skip
        for line in warnings_of(path.with_suffix(".log")):
            print(f"log: {line}")
        if report.get("trace"):
            print("trace: " + fit_trace.format_summary(report["trace"], rows=SUMMARY_TRACE_ROWS))
        for counts in report.get("step_ops", []):  # benchmarks/step_ops.py
            top = ", ".join(f"{row['operation']} {row['per_step']:g}" for row in counts["top"][:SUMMARY_TRACE_ROWS])
            print(f"{counts['profile']} ({counts['device']}, {counts['precision']}): {counts['operations_per_step']} "
                  f"operations dispatched a step ({counts['no_launch_per_step']} views, allocations); "
                  f"{top}")  # fmt: skip
        for trainer, runs in report.get("airbench", {}).items():
            scores = [accuracy for accuracy, _ in runs if accuracy is not None]
            seconds = [time for _, time in runs if time is not None]
            print(f"{trainer}: TTA {mean_sd(scores)} in {mean_sd(seconds, 2)} s ({len(runs)} runs: "
                  f"{', '.join(f'{accuracy}' for accuracy in scores)})")  # fmt: skip


def warnings_of(log: Path) -> list[str]:
    """The lines of a section's stderr that change how to read its times: torch.compile giving up on CUDA graphs
    (compile_mode=reduce-overhead then runs as plain compiled code), recompiling, falling back to eager, and whether
    train.cuda_graph captured the steps or ran them eagerly."""
    if not log.exists():
        return []
    flagged = ("skipping cudagraphs", "recompil", "falling back", "training uncompiled", "graph break",
               "train.cuda_graph")  # fmt: skip
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines()
             if any(flag in line.lower() for flag in flagged)]  # fmt: skip
    return list(dict.fromkeys(line[:200] for line in lines))[:5]  # each distinct line once, a few at most


def print_sweep(report: Path, rows: list[dict]) -> None:
    print(f"{len(rows)} runs")
    best_settings(report)  # prints each setting's decision, as --best-of made it
    print("| settings | seed | train s | acc | TTA | " + " | ".join(VARIANTS) + " |")
    for row in rows:
        variants = row.get("tta_variants", {})
        settings = " ".join(setting.partition(".")[2] for setting in row["settings"])  # without train./augment.
        print(f"| {settings} | {row['seed']} | {row['train_seconds']:.2f} | {row['accuracy']:.4f} | "
              f"{row['accuracy_tta']:.4f} | " + " | ".join(f"{variants.get(name, float('nan')):.4f}"
                                                        for name in VARIANTS) + " |")  # fmt: skip
    print_variant_means(rows)


def print_recipe(recipe: dict, target_seconds: float | None) -> None:
    """One line per recipe length; a section stopped early leaves fewer runs (and no summary of its own)."""
    runs = recipe["runs"]
    if not runs:
        print(f"{recipe['profile']}, {recipe['epochs']} epochs: no run finished")
        return
    # train_speed.py's runs call the train stage's function where Prefect is installed, else fit alone
    wall_key, wall_name = next(((key, name) for key, name in WALLS if all(key in run for run in runs)), WALLS[-1])
    figures = {key: mean_sd([run[key] for run in runs if key in run])
               for key in ("train_seconds", wall_key, "accuracy", "accuracy_tta")}  # fmt: skip
    each = ", ".join(f"{run['accuracy_tta']:.4f}" for run in runs)
    print(f"{recipe['profile']}, {recipe['epochs']} epochs, seeds {[run['seed'] for run in runs]}: training "
          f"{figures['train_seconds']} s, {wall_name} wall {figures[wall_key]} s, accuracy {figures['accuracy']}, "
          f"TTA {figures['accuracy_tta']} ({each})")  # fmt: skip
    if all("tta_seconds" in run for run in runs):  # airbench's own time counts its TTA pass too
        print(f"  the TTA pass {mean_sd([run['tta_seconds'] for run in runs], 3)} s; training plus "
              f"it {mean_sd([run['train_seconds'] + run['tta_seconds'] for run in runs], 3)} s")  # fmt: skip
    epochs = sorted(seconds for run in runs for seconds in run.get("epoch_seconds", []))
    if epochs:  # a noisy host shows as a median far above the fastest epoch (RESULTS.md, third GPU session)
        print(f"  epochs: fastest {epochs[0]:.3f} s, median {statistics.median(epochs):.3f} s, slowest "
              f"{epochs[-1]:.3f} s")  # fmt: skip
    if target_seconds is not None:
        slowest = max(run["train_seconds"] for run in runs)
        verdict = "within" if slowest <= target_seconds else "OVER"
        print(f"  slowest run {slowest:.2f} s: {verdict} the {target_seconds} s it was fitted to")
    print_variant_means(runs)


def print_variant_means(rows: list[dict]) -> None:
    scored = [row["tta_variants"] for row in rows if row.get("tta_variants")]
    if scored:
        means = {name: [v[name] for v in scored if name in v] for name in VARIANTS}  # older reports lack diagonals
        print("TTA combinations, mean: " + ", ".join(f"{name} {statistics.mean(values):.4f}"
                                                     for name, values in means.items() if values))  # fmt: skip


def mean_sd(values: list[float], digits: int = 4) -> str:
    if not values:
        return "n/a"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]))
