"""The accuracy-vs-latency scatter of the compression report, drawn with Pillow only (no matplotlib in kiln)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

WIDTH, HEIGHT = 760, 480
LEFT, RIGHT, TOP, BOTTOM = 72, 190, 44, 56  # margins around the plotting area; labels and legend go right
LABEL_HEIGHT = 13  # pixels per line of Pillow's default font, with a little air
COLOURS = {"chosen": (22, 150, 60), "qualifies": (40, 90, 200), "rejected": (160, 160, 160)}


def save_pareto_plot(rows: list[dict[str, Any]], selection: dict[str, Any], path: Path) -> None:
    """Accuracy (y) against batch-1 p50 latency (x, log scale when the spread is wide) for every variant.

    Colour says the verdict (chosen, qualifies, rejected), a ring marks the Pareto front, and a dashed line the
    lowest accuracy the budget allows (fp32's minus compress.max_accuracy_drop).
    """
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    latencies = [max(float(row["p50_ms"]), 1e-6) for row in rows]
    floor = selection["fp32_accuracy"] - selection["max_accuracy_drop"]
    accuracies = [float(row["accuracy"]) for row in rows] + [floor]
    logarithmic = max(latencies) / min(latencies) >= 5
    scale_x = math.log10 if logarithmic else (lambda value: value)
    x_low, x_high = _padded(scale_x(min(latencies)), scale_x(max(latencies)))
    y_low, y_high = _padded(min(accuracies), max(accuracies))
    right, bottom = WIDTH - RIGHT, HEIGHT - BOTTOM

    def to_pixel(latency: float, accuracy: float) -> tuple[float, float]:
        x = LEFT + (scale_x(latency) - x_low) / (x_high - x_low) * (right - LEFT)
        y = bottom - (accuracy - y_low) / (y_high - y_low) * (bottom - TOP)
        return x, y

    draw.rectangle([LEFT, TOP, right, bottom], outline="black")
    for step in range(5):  # ticks: 5 on each axis, labelled in data units
        fraction = step / 4
        x = LEFT + fraction * (right - LEFT)
        value = x_low + fraction * (x_high - x_low)
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x - 14, bottom + 8), f"{10**value if logarithmic else value:.3g}", fill="black")
        y = bottom - fraction * (bottom - TOP)
        draw.line([LEFT - 4, y, LEFT, y], fill="black")
        draw.text((LEFT - 52, y - 6), f"{100 * (y_low + fraction * (y_high - y_low)):.2f}%", fill="black")
    draw.text((LEFT, bottom + 28), f"batch-1 p50 latency, ms{' (log scale)' if logarithmic else ''}, onnxruntime CPU",
              fill="black")  # fmt: skip
    draw.text((LEFT, 8), f"Compression variants: test accuracy vs latency (objective: {selection['objective']})",
              fill="black")  # fmt: skip
    draw.text((LEFT, 24), "accuracy (full test set)", fill="black")
    budget_y = to_pixel(min(latencies), floor)[1]
    for x in range(LEFT, right, 10):
        draw.line([x, budget_y, min(x + 5, right), budget_y], fill=(200, 60, 60))
    draw.text((LEFT + 4, budget_y + 3), "lowest accuracy the budget allows", fill=(200, 60, 60))

    pareto = {row["variant"] for row in rows if row.get("pareto")}
    placed: list[tuple[float, float, float, float]] = []  # label boxes drawn so far
    for row, latency in zip(rows, latencies):
        x, y = to_pixel(latency, float(row["accuracy"]))
        verdict = _verdict(row["variant"], selection)
        radius = 7 if verdict == "chosen" else 5
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=COLOURS[verdict])
        if row["variant"] in pareto:
            draw.ellipse([x - radius - 3, y - radius - 3, x + radius + 3, y + radius + 3], outline="black")
        width = draw.textlength(row["variant"])
        start = x + radius + 4 if x + radius + 4 + width <= right else x - radius - 4 - width  # stay inside the axes
        label_x, label_y = _free_spot(placed, start, y - 6, width)
        if label_y != y - 6:  # moved away from a crowded spot: a leader line says whose label it is
            draw.line([x, y, label_x - 2 if label_x > x else label_x + width + 2, label_y + 6], fill=(120, 120, 120))
        draw.text((label_x, label_y), row["variant"], fill="black")

    legend_x = right + 16
    for index, (verdict, colour) in enumerate(COLOURS.items()):
        y = TOP + 8 + 20 * index
        draw.ellipse([legend_x, y, legend_x + 10, y + 10], fill=colour)
        draw.text((legend_x + 16, y - 1), verdict, fill="black")
    y = TOP + 8 + 20 * len(COLOURS)
    draw.ellipse([legend_x - 2, y - 2, legend_x + 12, y + 12], outline="black")
    draw.text((legend_x + 16, y - 1), "Pareto front", fill="black")
    image.save(path)


def _free_spot(placed: list, x: float, y: float, width: float) -> tuple[float, float]:
    """The nearest position at or above/below (x, y) where a label of `width` overlaps no placed label."""
    for shift in [0, *[sign * step * LABEL_HEIGHT for step in range(1, 12) for sign in (1, -1)]]:
        box = (x, y + shift, x + width, y + shift + LABEL_HEIGHT)
        if TOP <= box[1] and box[3] <= HEIGHT - BOTTOM and not any(_overlap(box, other) for other in placed):
            placed.append(box)
            return x, y + shift
    placed.append((x, y, x + width, y + LABEL_HEIGHT))
    return x, y


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _verdict(variant: str, selection: dict[str, Any]) -> str:
    if variant == selection["chosen"]:
        return "chosen"
    return "qualifies" if variant in selection["candidates"] else "rejected"


def _padded(low: float, high: float) -> tuple[float, float]:
    span = high - low
    pad = 0.08 * span if span > 0 else max(abs(low) * 0.05, 0.01)
    return low - pad, high + pad
