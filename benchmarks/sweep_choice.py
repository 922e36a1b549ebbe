"""Which value of each swept setting to carry forward, from a `train_speed.py --json-out` report (`--best-of`).

Plain Python (no torch), so `device_summary.py` prints the same decisions the device plan acted on.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path


def best_settings(report: Path) -> list[str]:
    """For each key a --json-out report's sweeps varied, its value with the highest mean TTA accuracy, compared only
    within complete blocks: runs whose other keys have the same values and that together cover every value of this
    key (over a full grid that is each key's main effect, averaged over all the others). A key without a complete
    block (a sweep cut short) is reported and left out, not decided on unbalanced runs."""
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
            settings = dict(setting.split("=", 1) for setting in row["settings"])
            if key in settings:
                others = tuple(sorted((name, value) for name, value in settings.items() if name != key))
                blocks.setdefault(others, {}).setdefault(settings[key], []).append(row["accuracy_tta"])
        complete = [block for block in blocks.values() if set(block) == set(values)]
        if not complete:
            print(f"# best of {report}: {key}: no decision, no complete block of runs over {', '.join(values)}")
            continue
        means = {value: statistics.mean(statistics.mean(block[value]) for block in complete) for value in values}
        best = max(values, key=means.get)  # a tie keeps the first value listed
        chosen.append(f"{key}={best}")
        summary = ", ".join(f"{value} {mean:.4f}" for value, mean in means.items())
        print(f"# best of {report}: {key}={best}; mean accuracy with TTA over {len(complete)} complete block(s): "
              f"{summary}")  # fmt: skip
    return chosen
