"""Which value of each swept setting to carry forward, from a `train_speed.py --json-out` report (`--best-of`).

Plain Python (no torch), so `device_summary.py` prints the same decisions the device plan acted on.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import Counter
from pathlib import Path


def grid_combinations(axes: list[tuple[str, list[str]]], half: bool = False) -> list[tuple[str, ...]]:
    """Every combination of the grid's values (the first key outermost), or with `half` the half of a two-level grid
    whose runs set an even number of keys to their second value: the 2^(k-1) fraction with defining relation
    I = AB...K. Each key's two values then meet every value of every other key equally often, so main effects are
    compared on balanced runs; with 5 keys two-setting interactions stay unconfounded with them too (resolution
    V), at half the runs."""
    combinations = list(itertools.product(*(values for _, values in axes)))
    if not half:
        return combinations
    not_two = [key for key, values in axes if len(values) != 2]
    if not_two or len(axes) < 3:
        misfits = ", ".join(not_two) or f"a grid of {len(axes)} key(s)"
        raise ValueError(f"a half fraction needs at least 3 keys of exactly 2 values each; {misfits} does not fit: "
                         "run the full grid instead")  # fmt: skip
    return [values for values in combinations
            if sum(value == options[1] for value, (_, options) in zip(values, axes)) % 2 == 0]  # fmt: skip


def best_settings(report: Path) -> list[str]:
    """For each key a --json-out report's sweeps varied, the value to carry forward: the first value listed (the
    baseline) unless another one's mean TTA accuracy beats it by more than the runs' noise, and then the best such
    value. "More than noise": the difference exceeds `t` (two-sided 95 %) times its standard error, estimated from
    the runs themselves (see _difference). Without an estimate (single runs of a single block) the baseline stays.

    Means are compared only within complete blocks: runs whose other keys have the same values and that together
    cover every value of this key (over a full grid that is each key's main effect, averaged over all the others).
    A fractional grid has no such blocks: there the means are taken over all runs, if they are balanced (every value
    of this key meets every value of each other key equally often, as in `grid_combinations(half=True)`). A key with
    neither (a sweep cut short) is reported and left out, not decided on unbalanced runs."""
    report_data = json.loads(report.read_text())
    rows = report_data.get("sweep", [])
    if not rows:
        raise SystemExit(f"--best-of {report}: the report has no sweep rows to choose from")
    axes: dict[str, list[str]] = {}
    for grid in report_data.get("grids", []):
        for key, values in grid.items():
            axes.setdefault(key, []).extend(value for value in values if value not in axes.get(key, []))
    chosen = []
    for key, values in axes.items():
        blocks: dict[tuple, dict[str, list[float]]] = {}
        for row in rows:
            settings = _settings(row)
            if key in settings:
                others = tuple(sorted((name, value) for name, value in settings.items() if name != key))
                blocks.setdefault(others, {}).setdefault(settings[key], []).append(row["accuracy_tta"])
        complete = [block for block in blocks.values() if set(block) == set(values)]
        runs = [row for row in rows if key in _settings(row)]
        if complete:
            differences = {value: _block_difference(complete, value, values[0]) for value in values[1:]}
            basis = f"{len(complete)} complete block(s)"
        elif _balanced([_settings(row) for row in runs], key, values):
            differences = {value: _fraction_difference(runs, key, value, values[0]) for value in values[1:]}
            basis = f"{len(runs)} balanced runs of a fractional grid"
        else:
            print(f"# best of {report}: {key}: no decision, no complete block of runs over {', '.join(values)} "
                  "and no balanced fraction")  # fmt: skip
            continue
        beyond_noise = {value: gain for value, (gain, margin) in differences.items()
                        if margin is not None and gain > margin}  # fmt: skip
        best = max(beyond_noise, key=beyond_noise.get) if beyond_noise else values[0]  # a tie: the first listed
        chosen.append(f"{key}={best}")
        summary = ", ".join(
            f"{value} {gain:+.4f} (noise {'unknown' if margin is None else f'±{margin:.4f}'})"
            for value, (gain, margin) in differences.items()
        ) or "the only value swept"
        print(f"# best of {report}: {key}={best}; mean accuracy with TTA against {values[0]} over {basis}: {summary}")
    return chosen


# Two-sided 95 % points of Student's t by degrees of freedom; between rows, the row below (fewer degrees: a larger
# t, erring toward keeping the first value); beyond 120, 1.96.
T_95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 12: 2.18,
        15: 2.13, 20: 2.09, 30: 2.04, 60: 2.00, 120: 1.98}  # fmt: skip


def _t95(degrees: int) -> float:
    if degrees > max(T_95):
        return 1.96
    return T_95[max(limit for limit in T_95 if limit <= degrees)]


def _block_difference(blocks: list[dict[str, list[float]]], value: str, baseline: str) -> tuple[float, float | None]:
    """(mean gain of `value` over `baseline` across complete blocks, the margin that gain must exceed). With two
    blocks or more the noise is the spread of the blocks' differences (paired by block, so the other keys' effects
    cancel); with one block, the pooled spread of its repeated runs (seeds); with single runs of one block, unknown."""
    gains = [statistics.mean(block[value]) - statistics.mean(block[baseline]) for block in blocks]
    if len(gains) >= 2:
        return statistics.mean(gains), _t95(len(gains) - 1) * statistics.stdev(gains) / len(gains) ** 0.5
    block = blocks[0]
    repeated = [name for name in (value, baseline) if len(block[name]) >= 2]
    degrees = sum(len(block[name]) - 1 for name in repeated)
    if degrees < 1:
        return gains[0], None
    pooled = sum(statistics.variance(block[name]) * (len(block[name]) - 1) for name in repeated) / degrees
    error = (pooled * (1 / len(block[value]) + 1 / len(block[baseline]))) ** 0.5
    return gains[0], _t95(degrees) * error


def _fraction_difference(runs: list[dict], key: str, value: str, baseline: str) -> tuple[float, float | None]:
    """(mean gain of `value` over `baseline` in a balanced fraction, its margin). The noise is what is left of the
    runs' accuracies once every key's main effect is taken out (in a balanced design, each value's mean minus the
    grand mean is its least-squares effect): the seeds' spread and the keys' interactions together (in the 16-run
    half of 5 two-value keys, one seed each, it is the 10 two-key interactions alone), so real interactions make
    it larger and the rule more reluctant; unknown when no degrees of freedom are left for it."""
    settings = [_settings(row) for row in runs]
    accuracies = [row["accuracy_tta"] for row in runs]
    grand = statistics.mean(accuracies)
    effects = {}
    for name in settings[0]:
        for level in {one[name] for one in settings}:
            effects[name, level] = statistics.mean(a for a, one in zip(accuracies, settings) if one[name] == level)
    residuals = [accuracy - grand - sum(effects[name, one[name]] - grand for name in one)
                 for accuracy, one in zip(accuracies, settings)]  # fmt: skip
    degrees = len(runs) - 1 - sum(len({one[name] for one in settings}) - 1 for name in settings[0])
    gain = effects[key, value] - effects[key, baseline]
    if degrees < 1:
        return gain, None
    variance = sum(residual**2 for residual in residuals) / degrees
    counts = [sum(one[key] == level for one in settings) for level in (value, baseline)]
    return gain, _t95(degrees) * (variance * (1 / counts[0] + 1 / counts[1])) ** 0.5


def _settings(row: dict) -> dict[str, str]:
    return dict(setting.split("=", 1) for setting in row["settings"])


def _balanced(settings: list[dict[str, str]], key: str, values: list[str]) -> bool:
    """The runs that set `key` (those of its grid) all set the same keys, and each value of `key` occurs equally
    often, alone and beside each value of every other key."""
    if not settings or any(set(one) != set(settings[0]) for one in settings):
        return False
    counts = Counter(one[key] for one in settings)
    if set(counts) != set(values) or len(set(counts.values())) != 1:
        return False
    for other in settings[0]:
        if other == key:
            continue
        pairs = Counter((one[key], one[other]) for one in settings)
        if len(pairs) != len(values) * len({one[other] for one in settings}) or len(set(pairs.values())) != 1:
            return False
    return True
