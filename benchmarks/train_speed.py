"""Training speed, in one process: (a) does the train stage keep the GPU fed, (b) time-to-accuracy of `cifar10-fast`.

    python benchmarks/train_speed.py --data ../shared/datasets/cifar10-jpg.tar.gz --runs 3
    python benchmarks/train_speed.py --data ../shared/datasets/cifar10-jpg.tar.gz --runs 3 --airbench  # + airbench

(a) feed: the bare training step of a model (`--feed-model`, default resnet9) on synthetic tensors already on the
    device, normalized and channels_last, against the train stage's own function (tasks/train.py's `train`, with
    its data path, augmentation and bookkeeping) on the real training images, same model, batch and precision.
    Both are timed after a warm-up; the ratio is the share of the bare speed the stage keeps.
(b) time-to-accuracy: the `cifar10-fast` profile's train/augment/evaluate settings, trained `--runs` times with
    seeds 0..runs-1 by the train stage's own function (tasks/train.py's `train`, on the images published into a
    scratch store as the download stage publishes them, with the augment stage's policy); training time counts
    from the first step to the last (the sum of epoch times, like airbench's total_time_seconds, which also counts
    its final TTA evaluation), and the wall time of the whole train stage call (reading its inputs, the fit,
    writing and hashing its output) is printed too. Where Prefect is not installed (tasks/ imports it), the runs
    call kiln.training.fit, and the wall time is that call's. With `--airbench` and the `airbench` package
    installed, airbench.train94 and train96 run on the same images (written where airbench's CifarLoader reads
    them), each after a one-epoch warm-up run.

Needs torch, numpy, pillow, pydantic and pyyaml, not Great Expectations; Prefect only for the runs through the train
stage's function (without it they call fit alone). On a GPU host without them, install kiln's remaining
requirements from a wheelhouse (benchmarks/device_checks.sh prepare). Runs on a CPU too, slowly:
`--max-train 2000 --max-test 500 --feed-steps 5 --epochs 1` is a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing kiln

from kiln.augmentation import build_transform, resolve_policy  # noqa: E402
from kiln.config import DataConfig, load_config  # noqa: E402
from kiln.dataset import ImageDataset, channel_statistics  # noqa: E402
from kiln.models import ModelSpec, build_model  # noqa: E402
from kiln.runtime.preprocess import Preprocessing  # noqa: E402
from kiln.training import (  # noqa: E402
    AugmentedImages, Runtime, compiled, cudnn_autotuned, fit, optimizer_for_run, predict_probabilities,
    resolve_runtime,
)
import fit_trace  # noqa: E402  (benchmarks/, the script's own folder, as is sweep_choice)
from sweep_choice import best_settings, grid_combinations  # noqa: E402  (benchmarks/, the script's own folder)

FIT_PROBE_EPOCHS = 3  # --fit-seconds' probe: the first epoch compiles and warms up, the others are timed


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    dataset = load_dataset(args)
    runtime = resolve_runtime(args.device, args.precision)
    print(f"# kiln training speed — {date.today()} — {device_name(runtime)} — torch {torch.__version__}")
    print(f"# command: python benchmarks/train_speed.py {' '.join(argv)}")
    print(f"# data: {dataset.name}, {len(dataset.train_labels)} train / {len(dataset.test_labels)} test images "
          f"{dataset.image_shape}")  # fmt: skip
    host = host_state()
    print(f"# host: {host['cpus']} CPUs ({host['cpu_model']}), load average {host['load_average']}")
    chosen = [setting for report in args.best_of for setting in best_settings(Path(report))]
    args.overrides = chosen + args.overrides  # a later report's choice overrides an earlier one's; --set beats both
    results: dict = {"device": device_name(runtime), "date": str(date.today()), "command": argv,
                     "overrides": args.overrides, "host": host}  # fmt: skip

    def save() -> None:  # after every section: a run stopped at its time limit keeps what it measured
        if args.json_out:  # whole or not at all: a later --best-of reads it, maybe after this run was killed
            temporary = Path(f"{args.json_out}.tmp")
            temporary.write_text(json.dumps(results, indent=2) + "\n")
            os.replace(temporary, args.json_out)

    if not args.skip_feed:
        results["feed"] = feed_benchmark(dataset, runtime, args)
        save()
    if args.sweep:
        warm_up(dataset, load_config(args.profile, overrides=args.overrides), args)
    for grid in args.sweep:
        results.setdefault("grids", []).append({key: values for key, values in grid})
        sweep_benchmark(dataset, args, grid, results.setdefault("sweep", []), save)
    if not args.skip_recipe:
        lengths = list(args.epochs or ([] if args.fit_seconds else [None]))
        if args.fit_seconds:
            results["fit_seconds"] = epochs_within(dataset, args)
            save()
            lengths = sorted(set(lengths) | {results["fit_seconds"]["epochs"]})
        for epochs in lengths:
            recipe_benchmark(dataset, args, epochs, results.setdefault("recipe", []), save)
    if args.trace:
        results["trace"] = trace_benchmark(dataset, args)
        save()
    if args.airbench:
        airbench_benchmark(dataset, args, results.setdefault("airbench", {}), save)
    results["host_after"] = host_state()
    results["compile_counters"] = compile_counters()
    save()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="CIFAR-style image folder or archive (train/<class>/..., test/<class>/...); "
                        "default: synthetic images (feed test only)")  # fmt: skip
    parser.add_argument("--data-cache", help="an .npz of the decoded --data: read if present, else written (for "
                        "several runs of this script on the same data and --max-train/--max-test)")  # fmt: skip
    parser.add_argument("--stage-store", type=_local_folder, help="a local folder for the store the train stage's "
                        "runs read their inputs from: kept, so that later runs of this script reuse the published "
                        "images and policy (each run's training output and checkpoints are deleted, so every run "
                        "trains); default: a temporary one")  # fmt: skip
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--feed-model", default="resnet9")
    parser.add_argument("--feed-batch", type=int, default=1024)
    parser.add_argument("--feed-steps", type=int, default=200, help="timed steps of the bare loop")
    parser.add_argument("--compile", default="off", choices=["on", "off"], help="for both loops of the feed test")
    parser.add_argument("--profile", default="cifar10-fast")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override the profile (and "
                        "--best-of's choices)")  # fmt: skip
    parser.add_argument("--epochs", type=_int_list, help="override the profile's train.epochs; a comma-separated "
                        "list (10,30) runs the recipe at each length, shortest first")  # fmt: skip
    parser.add_argument("--fit-seconds", type=_positive_float, help="also run the recipe at the most epochs whose "
                        "training time fits this many seconds on this device, as a probe run's warm epochs predict "
                        "(with no --epochs: only then); for time targets on devices of unknown speed")  # fmt: skip
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=0, help="the recipe's runs use seeds first..first+runs-1: "
                        "seeds a --best-of sweep did not choose on, for a fair measure of its winner")  # fmt: skip
    parser.add_argument("--warmup-epochs", type=int, default=1,
                        help="length of the unreported warm-up run before the recipe's runs; 0: none")
    parser.add_argument("--max-train", type=int)
    parser.add_argument("--max-test", type=int)
    parser.add_argument("--skip-feed", action="store_true")
    parser.add_argument("--skip-recipe", action="store_true")
    parser.add_argument("--sweep", action="append", default=[], type=_grid, help="a grid to try, --sweep-seeds runs "
                        "per combination at the first --epochs: 'train.lr=0.4,0.8;train.weight_decay=5e-5,5e-6' "
                        "(repeatable)")  # fmt: skip
    parser.add_argument("--sweep-seeds", type=_positive_int, default=1, help="seeds 0..N-1 for each combination")
    parser.add_argument("--sweep-fraction", default="full", choices=["full", "half"], help="half: of a grid of 3 or "
                        "more two-value keys, the balanced half (sweep_choice.grid_combinations); --best-of then "
                        "decides each key on all its runs")  # fmt: skip
    parser.add_argument("--best-of", action="append", default=[], help="a --json-out report with a sweep: for each "
                        "key it varied, the first value listed, or the one with the highest mean accuracy with TTA "
                        "among those that beat it by more than the runs' noise (sweep_choice.best_settings), "
                        "overrides the profile, unless --set sets that key (repeatable)")  # fmt: skip
    parser.add_argument("--trace", action="store_true", help="also profile one whole epoch of a run of the recipe "
                        "(benchmarks/fit_trace.py): device and host time a step, how busy the device is, top operators")
    parser.add_argument("--airbench", action="store_true", help="also run airbench's trainers if installed")
    parser.add_argument("--airbench-trainers", type=lambda text: text.split(","), default=["train94", "train96"])
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    if args.fit_seconds and args.skip_recipe:
        parser.error("--fit-seconds chooses the recipe's epochs, but --skip-recipe skips the recipe: drop one")
    for grid in args.sweep:
        try:
            grid_combinations(grid, half=args.sweep_fraction == "half")
        except ValueError as error:
            parser.error(f"--sweep {';'.join(key for key, _ in grid)}: {error}")
    return args


def _grid(text: str) -> list[tuple[str, list[str]]]:
    """'train.lr=0.4,0.8;train.weight_decay=5e-5' -> [("train.lr", ["0.4", "0.8"]), ...]."""
    axes = []
    for part in filter(None, text.split(";")):
        key, equals, values = part.partition("=")
        if not equals or not key or not values:
            raise argparse.ArgumentTypeError(f"{part!r} is not KEY=VALUE[,VALUE...], e.g. train.lr=0.4,0.8")
        axes.append((key, values.split(",")))
    if not axes:
        raise argparse.ArgumentTypeError("an empty grid: give KEY=VALUE[,VALUE...] pairs separated by ';'")
    return axes


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def _local_folder(text: str) -> Path:
    if "://" in text:  # the runs delete their outputs with local file operations
        raise argparse.ArgumentTypeError(f"{text!r} is a URL: --stage-store takes a local folder")
    return Path(text)


def _int_list(text: str) -> list[int]:
    return sorted(int(value) for value in text.split(","))


def load_dataset(args: argparse.Namespace) -> ImageDataset:
    if args.data is None:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, size=(50_000, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=50_000)
        return ImageDataset("synthetic", [str(i) for i in range(10)], images, labels, images[:10_000], labels[:10_000])
    from kiln.sources import load_source

    cache = Path(args.data_cache) if args.data_cache else None
    # What the cache holds must be what these arguments ask for: a cache of a smaller --max-train would quietly
    # train on a few hundred images.
    origin = json.dumps([str(Path(args.data).resolve()), args.max_train, args.max_test])
    if cache is not None and cache.exists():
        arrays = np.load(cache, allow_pickle=False)
        if "origin" in arrays and str(arrays["origin"]) == origin:
            return ImageDataset(str(arrays["name"]), [str(name) for name in arrays["classes"]],
                                arrays["train_images"], arrays["train_labels"], arrays["test_images"],
                                arrays["test_labels"])  # fmt: skip
        print(f"# {cache} holds other data or limits than these arguments: decoding again", file=sys.stderr)
    config = DataConfig(source="imagefolder", uri=args.data, max_train_samples=args.max_train,
                        max_test_samples=args.max_test)  # fmt: skip
    dataset = load_source(config).dataset
    if cache is not None:
        temporary = cache.with_name(f"{cache.name}.tmp.npz")
        np.savez(temporary, origin=origin, name=dataset.name, classes=np.array(dataset.classes),
                 train_images=dataset.train_images, train_labels=dataset.train_labels,
                 test_images=dataset.test_images, test_labels=dataset.test_labels)  # fmt: skip
        os.replace(temporary, cache)
    return dataset


def preprocessing(dataset: ImageDataset) -> Preprocessing:
    mean, std = channel_statistics(dataset.train_images)
    height, width, channels = dataset.image_shape
    return Preprocessing(height, width, channels, tuple(mean), tuple(std))


# --------------------------------------------------------------------------------------------------------------
# (a) feed
# --------------------------------------------------------------------------------------------------------------
def feed_benchmark(dataset: ImageDataset, runtime: Runtime, args: argparse.Namespace) -> dict:
    from kiln.config import TrainConfig

    config = TrainConfig(model=args.feed_model, epochs=2, batch_size=args.feed_batch, optimizer="sgd", lr=0.01,
                         precision=runtime.precision, device=runtime.device.type, validation_fraction=0,
                         data_path="auto", compile=args.compile)  # fmt: skip
    bare = bare_loop_images_per_s(dataset, runtime, config, args.feed_steps)
    augment_config = load_config(args.profile).augment
    with tempfile.TemporaryDirectory() as scratch:
        if StageInputs.available():
            stage = StageInputs(dataset, augment_config, args.stage_store or Path(scratch))
            _, history, _ = stage.train(config, runtime)
            stage_call = "the train stage's function"
        else:
            _, history, _ = fit_alone(dataset, augment_config, config, runtime)
            stage_call = "fit (Prefect is not installed)"
    stage = history[-1]["images_per_s"]  # the second epoch: warm
    print("\n## (a) feed: bare training step vs the train stage's loop")
    print(f"model {config.model}, batch {config.batch_size}, {runtime.precision}, compile {args.compile}, "
          f"train stage data path: {history[-1]['data_path']}")  # fmt: skip
    print("| loop | img/s |\n|---|---|")
    print(f"| bare step on synthetic device tensors | {bare:,.0f} |")
    print(f"| train stage ({stage_call}), epoch 2 | {stage:,.0f} |")
    print(f"| ratio | {stage / bare:.3f} |")
    return {"model": config.model, "batch": config.batch_size, "precision": runtime.precision, "compile": args.compile,
            "bare_images_per_s": bare, "stage_images_per_s": stage, "ratio": stage / bare,
            "data_path": history[-1]["data_path"]}  # fmt: skip


def bare_loop_images_per_s(dataset: ImageDataset, runtime: Runtime, config, steps: int) -> float:
    with cudnn_autotuned(runtime.device):  # as fit runs: the same convolution algorithms on both sides
        return _bare_loop_images_per_s(dataset, runtime, config, steps)


def _bare_loop_images_per_s(dataset: ImageDataset, runtime: Runtime, config, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(ModelSpec(config.model, dataset.image_shape, len(dataset.classes))).to(runtime.device)
    channels_last = runtime.device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # as fit builds them: fused on CUDA, compiled (Muon's iteration too) as config.compile says
    optimizer = optimizer_for_run(model, config, runtime, steps)
    step_model = compiled(model, config, runtime, steps)
    height, width, channels = dataset.image_shape
    inputs = torch.randn(config.batch_size, channels, height, width, device=runtime.device)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, len(dataset.classes), (config.batch_size,), device=runtime.device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def one_step() -> None:
        with runtime.autocast():
            loss = loss_fn(step_model(inputs).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    for _ in range(max(3, steps // 10)):  # warm-up: kernels chosen, compiled, caches filled
        one_step()
    synchronize(runtime)
    started = time.perf_counter()
    for _ in range(steps):
        one_step()
    synchronize(runtime)
    return steps * config.batch_size / (time.perf_counter() - started)


# --------------------------------------------------------------------------------------------------------------
# (b) time-to-accuracy
# --------------------------------------------------------------------------------------------------------------
def recipe_benchmark(dataset: ImageDataset, args: argparse.Namespace, epochs: int | None, recipes: list[dict],
                     save: Callable[[], None]) -> None:
    """--runs seeded runs of the recipe at `epochs`, appended to `recipes` as one entry and saved after each run:
    a section stopped at its time limit keeps the runs it finished."""
    overrides = list(args.overrides) + ([f"train.epochs={epochs}"] if epochs else [])
    config = load_config(args.profile, overrides=overrides)
    runtime = resolve_runtime(config.train.device, config.train.precision)
    print(f"\n## (b) time-to-accuracy: profile {args.profile} ({config.train.model}, {config.train.epochs} epochs, "
          f"batch {config.train.batch_size}, {runtime.precision}, TTA {config.evaluate.tta})")  # fmt: skip
    through_stage = StageInputs.available()
    if not through_stage:
        print("# Prefect is not installed, so the runs call kiln.training.fit, not the train stage's function "
              "(tasks/ imports Prefect): the wall column is the fit call's")  # fmt: skip
    wall_key = "stage_wall_seconds" if through_stage else "fit_wall_seconds"
    print(f"| seed | training s | {'train stage' if through_stage else 'fit'} wall s | test accuracy | with TTA |\n"
          "|---|---|---|---|---|", flush=True)  # fmt: skip
    warm_up(dataset, config, args)
    rows: list[dict] = []
    recipes.append({"profile": args.profile, "epochs": config.train.epochs, "runs": rows})
    with tempfile.TemporaryDirectory() as scratch:
        root = args.stage_store or Path(scratch)
        stage = StageInputs(dataset, config.augment, root) if through_stage else None
        for seed in range(args.first_seed, args.first_seed + args.runs):
            row = train_once(dataset, config, seed, stage=stage)
            rows.append(row)
            save()
            print(f"| {row['seed']} | {row['train_seconds']:.2f} | {row[wall_key]:.2f} | {row['accuracy']:.4f} "
                  f"| {row['accuracy_tta']:.4f} |", flush=True)  # fmt: skip
    recipes[-1]["summary"] = summary = summarize(rows)
    save()
    print(f"| mean ± sd | {summary['train_seconds']} | {summary[wall_key]} | {summary['accuracy']} | "
          f"{summary['accuracy_tta']} |")  # fmt: skip


def epochs_within(dataset: ImageDataset, args: argparse.Namespace) -> dict:
    """The most epochs of the recipe (at least 1) whose training --fit-seconds allows, at the time per epoch of the
    later epochs of an unreported probe run: its first epoch compiles, times cuDNN's algorithms and fills caches."""
    config = load_config(args.profile, overrides=args.overrides)
    probe = train_once(dataset, config, seed=0, epochs=FIT_PROBE_EPOCHS, evaluate=False)
    epoch_seconds = max(max(probe["epoch_seconds"][1:]), 1e-3)  # the slower of the warm epochs: a margin, not a bet
    epochs = max(1, int(args.fit_seconds / epoch_seconds))
    print(f"\n# --fit-seconds {args.fit_seconds:g}: up to {epoch_seconds:.3f} s an epoch in the probe's warm "
          f"epochs, so {epochs} epochs", flush=True)  # fmt: skip
    return {"seconds": args.fit_seconds, "probe_epoch_seconds": epoch_seconds, "epochs": epochs}


def trace_benchmark(dataset: ImageDataset, args: argparse.Namespace) -> dict:
    """One run of the recipe under torch.profiler, after the warm-up run (compiled graphs and cuDNN's choices come
    from it, as for the timed runs)."""
    config = load_config(args.profile, overrides=args.overrides)
    runtime = resolve_runtime(config.train.device, config.train.precision)
    warm_up(dataset, config, args)
    with fit_trace.EpochTrace(runtime.device) as trace:
        train_once(dataset, config, seed=0, epochs=fit_trace.TRACED_EPOCH + 1, evaluate=False, on_epoch=trace.on_epoch)
    steps = len(dataset.train_labels) // min(config.train.batch_size, len(dataset.train_labels))  # full batches only
    summary = trace.summary(steps)
    print(f"\n## trace: profile {args.profile} ({config.train.model}, batch {config.train.batch_size}, "
          f"{runtime.precision}, compile {config.train.compile}/{config.train.compile_mode}, cuda_graph "
          f"{config.train.cuda_graph}), epoch "
          f"{fit_trace.TRACED_EPOCH} of {fit_trace.TRACED_EPOCH + 1} under torch.profiler")  # fmt: skip
    print(fit_trace.format_summary(summary), flush=True)
    return summary


def warm_up(dataset: ImageDataset, config, args: argparse.Namespace) -> None:
    """A short unreported run first: the first CUDA use and cuDNN's algorithm choices are not timed."""
    if args.warmup_epochs:
        train_once(dataset, config, seed=0, epochs=min(args.warmup_epochs, config.train.epochs), evaluate=False)


def sweep_benchmark(dataset: ImageDataset, args: argparse.Namespace, axes: list[tuple[str, list[str]]],
                    rows: list[dict], save: Callable[[], None]) -> None:
    """Runs of the profile with seeds 0..--sweep-seeds-1 for every combination of a grid's values (see `_grid`; with
    --sweep-fraction half, the balanced half of them), seeds innermost, so that a sweep cut short has compared whole
    combinations. Each run is appended to `rows` and saved as it ends."""
    grid = ";".join(f"{key}={','.join(values)}" for key, values in axes)
    base = list(args.overrides) + ([f"train.epochs={args.epochs[0]}"] if args.epochs else [])
    seeds = range(args.sweep_seeds)
    half = args.sweep_fraction == "half"
    print(f"\n## sweep over {grid}{' (the balanced half)' if half else ''} (profile {args.profile}, "
          f"{' '.join(base) or 'as is'}, seeds 0-{seeds[-1]})")  # fmt: skip
    print("| settings | seed | training s | test accuracy | with TTA |\n|---|---|---|---|---|", flush=True)
    for values in grid_combinations(axes, half):
        settings = [f"{key}={value}" for (key, _), value in zip(axes, values)]
        config = load_config(args.profile, overrides=base + settings)
        for seed in seeds:
            row = {"settings": settings, **train_once(dataset, config, seed=seed)}
            rows.append(row)
            save()
            print(f"| {' '.join(settings)} | {seed} | {row['train_seconds']:.2f} | {row['accuracy']:.4f} "
                  f"| {row['accuracy_tta']:.4f} |", flush=True)  # fmt: skip


def train_once(dataset: ImageDataset, config, seed: int, epochs: int | None = None, evaluate: bool = True,
               on_epoch: Callable[[dict], None] | None = None, stage: StageInputs | None = None) -> dict:
    """Train the config's model on the whole training split; its training seconds (first step to last), the wall
    seconds of the call that trained it and its test accuracy. With `stage`, that call is the train stage's own
    function (tasks/train.py: its inputs read from a store, the fit, its output written and hashed):
    `stage_wall_seconds`; without, kiln.training.fit alone: `fit_wall_seconds`."""
    prep = preprocessing(dataset)
    runtime = resolve_runtime(config.train.device, config.train.precision)
    update = {"seed": seed, "validation_fraction": 0.0, **({"epochs": epochs} if epochs else {})}
    train_config = config.train.model_copy(update=update)
    if stage is not None:
        model, history, wall = stage.train(train_config, runtime, on_epoch)
        row = {"seed": seed, "stage_wall_seconds": wall}
    else:
        model, history, wall = fit_alone(dataset, config.augment, train_config, runtime, on_epoch)
        row = {"seed": seed, "fit_wall_seconds": wall}
    epoch_seconds = [epoch["seconds"] for epoch in history]
    row |= {"train_seconds": sum(epoch_seconds), "epoch_seconds": epoch_seconds, "data_path": history[-1]["data_path"],
            "final_train_loss": float(history[-1]["train_loss"])}  # fmt: skip
    if evaluate:
        row["accuracy"] = accuracy(model, dataset, prep, runtime, "none")
        tta = config.evaluate.tta
        row["accuracy_tta"] = row["accuracy"]
        if tta != "none":
            # airbench's total_time_seconds also counts its TTA pass: comparable in scope, not identical (kiln's
            # copies the test images from host memory; airbench's keep them on the GPU).
            synchronize(runtime)
            started = time.perf_counter()
            row["accuracy_tta"] = accuracy(model, dataset, prep, runtime, tta)
            synchronize(runtime)
            row["tta_seconds"] = time.perf_counter() - started
        if tta == "flip_translate":
            row["tta_variants"] = tta_variants(model, dataset, prep, runtime)
    return row


def fit_alone(dataset: ImageDataset, augment_config, train_config, runtime: Runtime,
              on_epoch: Callable[[dict], None] | None = None) -> tuple[torch.nn.Module, list[dict], float]:
    """kiln.training.fit on the dataset's whole training split, as the train stage calls it: (the trained model,
    its per-epoch history, the fit call's wall seconds)."""
    prep = preprocessing(dataset)
    spec = resolve_policy(augment_config, dataset.image_shape, list(prep.mean))
    torch.manual_seed(train_config.seed)
    model = build_model(ModelSpec(train_config.model, dataset.image_shape, len(dataset.classes)))
    train_set = AugmentedImages(dataset.train_images, dataset.train_labels, build_transform(spec), spec)
    with tempfile.TemporaryDirectory() as scratch:
        synchronize(runtime)
        started = time.perf_counter()
        history = fit(model, train_set, None, prep, train_config, runtime, Path(scratch) / "checkpoint.pt",
                      on_epoch=on_epoch)
        synchronize(runtime)
        return model, history, time.perf_counter() - started


class StageInputs:
    """The train stage's inputs for one recipe, in a local store: the decoded images published as the download
    stage would publish them and the augment stage's own output for the recipe's policy. `train` runs the train
    stage's function on them (tasks/train.py, as a pipeline run calls it, without Prefect's task around it) and
    deletes the output it wrote, so that a store kept for later runs (--stage-store) holds only the inputs.
    Needs Prefect installed (tasks/ imports it for the task wrappers); `StageInputs.available()` says whether."""

    def __init__(self, dataset: ImageDataset, augment_config, root: Path):
        from kiln.dataset import publish_dataset
        from kiln.store import ArtifactStore
        from tasks.augment import augment
        from tasks.train import STAGE

        self.store = ArtifactStore(root)
        self.dataset_ref = publish_dataset(self.store, dataset)
        self.policy_ref = augment(augment_config, self.dataset_ref, self.store)
        STAGE.code_version()  # hashes the stage's sources once (cached): not inside the first timed call

    @staticmethod
    def available() -> bool:
        try:
            import tasks.train  # noqa: F401
        except ImportError:
            return False
        return True

    def train(self, train_config, runtime: Runtime, on_epoch: Callable[[dict], None] | None = None,
              ) -> tuple[torch.nn.Module, list[dict], float]:  # fmt: skip
        """(the trained model, as fit leaves it: on the device, channels_last on CUDA; its per-epoch history; the
        stage call's wall seconds)."""
        import pandas as pd

        from kiln.models import load_model
        from tasks.train import STAGE, train

        inputs = {"dataset": self.dataset_ref, "policy": self.policy_ref}
        self._forget(STAGE.key(train_config, inputs))
        synchronize(runtime)
        started = time.perf_counter()
        ref = train(train_config, self.dataset_ref, self.policy_ref, self.store, on_epoch=on_epoch)
        synchronize(runtime)
        wall = time.perf_counter() - started
        if ref.reused:
            raise RuntimeError(f"the train stage reused {ref.uri} instead of training: the run's time would be void")
        output = self.store.materialize(ref)
        model, _ = load_model(output)
        history = pd.read_csv(output / "history.csv").to_dict(orient="records")
        self._forget(ref.key)
        model = model.to(runtime.device)
        if runtime.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model, history, wall

    def _forget(self, key: str) -> None:
        """Remove the train stage's output and checkpoints for `key`: one left by a run killed in this store would
        be reused, or resumed from its checkpoint, instead of trained."""
        shutil.rmtree(self.store.output_path("train", key), ignore_errors=True)
        shutil.rmtree(self.store.scratch_dir("train", key), ignore_errors=True)


def accuracy(model, dataset: ImageDataset, prep: Preprocessing, runtime: Runtime, tta: str) -> float:
    probabilities = predict_probabilities(model, dataset.test_images, prep, runtime, 2000, tta=tta)
    return float((probabilities.argmax(axis=1) == dataset.test_labels).mean())


UNSHIFTED_VIEWS = ("image", "mirror")
TTA_VIEW_SETS = {  # of shifted_views' names
    "kiln": UNSHIFTED_VIEWS + ("image_up_left", "image_down_right", "mirror_up_left", "mirror_down_right"),
    "airbench": UNSHIFTED_VIEWS + ("image_up_left", "image_down_right", "mirror_up_right", "mirror_down_left"),
    "diagonals": UNSHIFTED_VIEWS + tuple(f"{source}_{corner}" for source in ("image", "mirror")
                                         for corner in ("up_left", "down_right", "up_right", "down_left")),
}


def tta_variants(model, dataset: ImageDataset, prep: Preprocessing, runtime: Runtime) -> dict[str, float]:
    """Accuracy of other flip+translate test-time augmentations, from the same trained model and the ten views of
    `shifted_views`. Three sets: kiln's six (evaluate.tta=flip_translate: the image and its mirror, both shifted
    one pixel up-left and down-right), airbench's six (the image's two shifts and their mirrors: for the mirror,
    the other diagonal) and all ten (`diagonals`: the image and its mirror, each shifted along both diagonals).
    kiln's and airbench's are each combined as a plain mean of probabilities (kiln's `kiln_probs` must equal
    accuracy_tta) and as airbench's weighted mean of logits (unshifted views 1/4 each, shifted 1/8:
    `airbench_logits_wtd` is airbench's own TTA, scored by kiln's evaluate.tta=flip_translate_weighted); the ten
    as a plain mean. Log-probabilities stand in for logits: per view they differ by a constant across classes, so
    a weighted sum has the same argmax."""
    probabilities = {name: predict_probabilities(model, view, prep, runtime, 2000)
                     for name, view in shifted_views(dataset.test_images).items()}  # fmt: skip

    def hit_rate(combined: np.ndarray) -> float:
        return float((combined.argmax(axis=1) == dataset.test_labels).mean())

    scores = {}
    for name, chosen in TTA_VIEW_SETS.items():
        scores[f"{name}_probs"] = hit_rate(sum(probabilities[view] for view in chosen))
    scores["kiln_logits_wtd"] = hit_rate(sum((0.25 if view in UNSHIFTED_VIEWS else 0.125)
                                             * np.log(np.clip(probabilities[view], 1e-30, None))
                                             for view in TTA_VIEW_SETS["kiln"]))  # fmt: skip
    scores["airbench_logits_wtd"] = accuracy(model, dataset, prep, runtime, "flip_translate_weighted")
    return scores


def shifted_views(images: np.ndarray) -> dict[str, np.ndarray]:
    """Ten views of uint8 NHWC images: the images and their mirrors, each as it is and moved one pixel along both
    diagonals (reflect-padded, as kiln's evaluate stage pads). `image_up_left` is the window one pixel up and left
    of the image's in the padded image. A mirrored view is the mirror of the image view on the other diagonal
    (`mirror_up_right` is image_up_left mirrored): airbench's flipped shifts."""
    height, width = images.shape[1:3]
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    views = {}
    for name, source in (("image", images), ("mirror", images[:, :, ::-1])):
        padded = np.pad(source, pad, mode="reflect")
        views[name] = padded[:, 1:-1, 1:-1]
        views[f"{name}_up_left"], views[f"{name}_down_right"] = padded[:, :height, :width], padded[:, 2:, 2:]
        views[f"{name}_up_right"], views[f"{name}_down_left"] = padded[:, :height, 2:], padded[:, 2:, :width]
    return {name: np.ascontiguousarray(view) for name, view in views.items()}


def summarize(rows: list[dict]) -> dict[str, str]:
    def mean_sd(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {spread:.4f}"

    keys = ("train_seconds", "fit_wall_seconds", "stage_wall_seconds", "accuracy", "accuracy_tta")
    return {key: mean_sd([row[key] for row in rows]) for key in keys if all(key in row for row in rows)}


def airbench_benchmark(
    dataset: ImageDataset, args: argparse.Namespace, results: dict, save: Callable[[], None]
) -> None:
    """Fills `results` ({trainer: [(TTA accuracy, seconds), ...]}) run by run, calling `save` after each."""
    try:
        import airbench
    except ImportError:
        print("\n## airbench: not installed (pip install airbench), skipped")
        return
    if not torch.cuda.is_available():  # its loaders put the data on the GPU unconditionally
        print("\n## airbench: needs a CUDA GPU, skipped")
        return
    print("\n## airbench on the same images (its own total_time_seconds and TTA accuracy)")
    print("| trainer | run | TTA accuracy | seconds |\n|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as scratch, _working_directory(Path(scratch)):
        # airbench's CifarLoader reads cifar10/{train,test}.pt from the working directory when present.
        Path("cifar10").mkdir()
        for split, images, labels in (("train", dataset.train_images, dataset.train_labels),
                                      ("test", dataset.test_images, dataset.test_labels)):  # fmt: skip
            torch.save({"images": torch.from_numpy(images), "labels": torch.from_numpy(labels),
                        "classes": list(dataset.classes)}, f"cifar10/{split}.pt")  # fmt: skip
        for name in args.airbench_trainers:
            train = getattr(airbench, name)
            train(run="warmup", epochs=1, verbose=False)  # one epoch warms CUDA and cuDNN's choices up
            runs = results[name] = []
            for run in range(args.runs):
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    train(run=run, verbose=True)
                accuracy_tta, seconds = _airbench_final_row(printed.getvalue())
                runs.append((accuracy_tta, seconds))
                print(f"| {name} | {run} | {accuracy_tta} | {seconds} |", flush=True)
                save()


def _airbench_final_row(text: str) -> tuple[float | None, float | None]:
    """(tta_val_acc, total_time_seconds) from airbench's last printed table row."""
    rows = [line for line in text.splitlines() if line.strip().startswith("|") and "eval" in line]
    numbers = [float(value) for value in re.findall(r"\d+\.\d+", rows[-1])] if rows else []
    return (numbers[-2], numbers[-1]) if len(numbers) >= 2 else (None, None)


@contextlib.contextmanager
def _working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def synchronize(runtime: Runtime) -> None:
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()


def compile_counters() -> dict:
    """What torch.compile did in this process: graphs compiled, graph breaks, and the graphs CUDA graphs skipped
    (compile_mode=reduce-overhead then runs them as plain compiled code; TORCH_LOGS=cudagraphs says why)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}  # fmt: skip


def host_state() -> dict:
    """The CPU that issues the GPU's work, and how busy it is: a small network's steps wait on it. The load average
    at a section's start still carries the one before it (and torch.compile's worker processes): read it beside
    the epochs' spread, not alone."""
    model = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo")
                  if line.startswith("model name")), platform.processor() or platform.machine())  # fmt: skip
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpus": os.cpu_count(), "cpu_model": model, "load_average": [round(value, 2) for value in load]}


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def device_name(runtime: Runtime) -> str:
    if runtime.device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


if __name__ == "__main__":
    # kiln's own lines on stderr (the device checks keep it as each section's log): which data path, compile and
    # CUDA-graph choices a run made, and why.
    logging.basicConfig(stream=sys.stderr, format="%(levelname).1s %(name)s: %(message)s")
    logging.getLogger("kiln").setLevel(logging.INFO)
    main(sys.argv[1:])
