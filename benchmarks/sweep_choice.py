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
    """For each key a --json-out report's sweeps varied, its value with the highest mean TTA accuracy, compared only
    within complete blocks: runs whose other keys have the same values and that together cover every value of this
    key (over a full grid that is each key's main effect, averaged over all the others). A fractional grid has no
    such blocks: there the means are taken over all runs, if they are balanced (every value of this key meets every
    value of each other key equally often, as in `grid_combinations(half=True)`). A key with neither (a sweep cut
    short) is reported and left out, not decided on unbalanced runs."""
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
        if complete:
            means = {value: statistics.mean(statistics.mean(block[value]) for block in complete) for value in values}
            basis = f"{len(complete)} complete block(s)"
        elif _balanced([_settings(row) for row in rows if key in _settings(row)], key, values):
            means = {value: statistics.mean(row["accuracy_tta"] for row in rows if _settings(row).get(key) == value)
                     for value in values}  # fmt: skip
            basis = f"{sum(key in _settings(row) for row in rows)} balanced runs of a fractional grid"
        else:
            print(f"# best of {report}: {key}: no decision, no complete block of runs over {', '.join(values)} "
                  "and no balanced fraction")  # fmt: skip
            continue
        best = max(values, key=means.get)  # a tie keeps the first value listed
        chosen.append(f"{key}={best}")
        summary = ", ".join(f"{value} {mean:.4f}" for value, mean in means.items())
        print(f"# best of {report}: {key}={best}; mean accuracy with TTA over {basis}: {summary}")
    return chosen


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
