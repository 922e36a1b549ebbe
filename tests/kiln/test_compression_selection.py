"""The selection policy: the best qualifying variant by the objective, fp32 when none qualifies; the Pareto front;
and the scatter plot that shows both."""

from __future__ import annotations

import pytest
from PIL import Image

from kiln.compression.plot import save_pareto_plot
from kiln.compression.selection import pareto_front, select_variant
from kiln.config import CompressConfig


def row(variant: str, accuracy: float, p50_ms: float, throughput_ips: float = 100.0, size_bytes: int = 1000) -> dict:
    return {"variant": variant, "file": f"model.{variant}.onnx", "accuracy": accuracy, "p50_ms": p50_ms,
            "throughput_ips": throughput_ips, "size_bytes": size_bytes}  # fmt: skip


ROWS = [
    row("fp32", 0.900, 4.0, throughput_ips=200, size_bytes=4000),
    row("int8_static", 0.898, 2.0, throughput_ips=420, size_bytes=1000),
    row("prune_structured", 0.897, 1.5, throughput_ips=380, size_bytes=2400),  # fastest at batch 1
    row("distill", 0.880, 0.5, throughput_ips=900, size_bytes=900),  # fastest, but 2 points worse
    row("fp16", 0.900, 9.0, throughput_ips=90, size_bytes=2000),
]


def test_the_fastest_variant_within_budget_ships():
    selection = select_variant(ROWS, CompressConfig(max_accuracy_drop=0.005))
    assert (selection["chosen"], selection["file"], selection["stage"]) == (
        "prune_structured", "model.prune_structured.onnx", "compress"
    )  # fmt: skip
    assert selection["candidates"] == ["fp32", "int8_static", "prune_structured"]
    assert set(selection["rejected"]) == {"distill", "fp16"}
    assert "exceeds compress.max_accuracy_drop" in selection["rejected"]["distill"]
    assert "exclude_from_selection" in selection["rejected"]["fp16"]
    assert selection["accuracy_drop"] == pytest.approx(0.003)
    assert "2.67x faster than fp32" in selection["reason"] and selection["reason"].endswith(".")


@pytest.mark.parametrize(
    ("objective", "chosen"), [("latency", "prune_structured"), ("throughput", "int8_static"), ("size", "int8_static")]
)
def test_the_objective_decides_among_qualifying_variants(objective, chosen):
    assert select_variant(ROWS, CompressConfig(objective=objective))["chosen"] == chosen


def test_a_wider_budget_lets_the_student_win():
    assert select_variant(ROWS, CompressConfig(max_accuracy_drop=0.02))["chosen"] == "distill"


def test_fp32_ships_when_no_variant_qualifies():
    selection = select_variant(ROWS, CompressConfig(max_accuracy_drop=0.001))
    assert (selection["chosen"], selection["file"], selection["stage"]) == ("fp32", "model.fp32.onnx", "export")
    assert selection["candidates"] == ["fp32"]
    assert selection["reason"].startswith("No compressed variant qualifies (int8_static: accuracy drop 0.0020")


def test_fp32_ships_when_it_is_itself_the_fastest():
    rows = [row("fp32", 0.9, 0.03), row("int8_static", 0.9, 0.08)]  # tiny models: quantize/dequantize costs more
    selection = select_variant(rows, CompressConfig())
    assert selection["chosen"] == "fp32" and selection["candidates"] == ["fp32", "int8_static"]
    assert "no compressed variant beats it" in selection["reason"]


def test_excluding_nothing_lets_fp16_compete():
    rows = [row("fp32", 0.9, 4.0), row("fp16", 0.9, 1.0)]
    assert select_variant(rows, CompressConfig())["chosen"] == "fp32"
    assert select_variant(rows, CompressConfig(exclude_from_selection=[]))["chosen"] == "fp16"


@pytest.mark.parametrize(
    ("fp32_accuracy", "int8_accuracy", "budget", "chosen"),
    [
        (0.97, 0.96, 0.01, "int8_static"),  # exactly at the budget (0.97 - 0.96 is 0.01000...09 in floats)
        (0.97, 0.955, 0.01, "fp32"),
        (0.90, 0.91, 0.0, "int8_static"),  # more accurate than fp32
        (0.90, 0.90, 0.0, "int8_static"),
        (0.90, 0.8999, 0.0, "fp32"),
    ],
)
def test_the_budget_edge_is_inclusive(fp32_accuracy, int8_accuracy, budget, chosen):
    rows = [row("fp32", fp32_accuracy, 2.0), row("int8_static", int8_accuracy, 1.0)]
    selection = select_variant(rows, CompressConfig(max_accuracy_drop=budget))
    assert selection["chosen"] == chosen


def test_ties_go_to_the_more_accurate_then_the_smaller():
    rows = [
        row("fp32", 0.90, 2.0, size_bytes=4000),
        row("int8_static", 0.899, 1.0, size_bytes=1000),  # as fast and smallest, but less accurate
        row("int8_dynamic", 0.90, 1.0, size_bytes=3000),
        row("prune_structured", 0.90, 1.0, size_bytes=2000),
    ]
    assert select_variant(rows, CompressConfig())["chosen"] == "prune_structured"


def test_no_variants_ships_fp32_and_says_so():
    selection = select_variant([row("fp32", 0.9, 1.0)], CompressConfig(variants=[]))
    assert selection["chosen"] == "fp32" and "compress.variants is empty" in selection["reason"]


def test_pareto_front_keeps_only_undominated_variants():
    assert pareto_front(ROWS) == {"fp32", "int8_static", "prune_structured", "distill"}  # fp16: slower, no better
    assert pareto_front([row("a", 0.9, 1.0), row("b", 0.9, 1.0)]) == {"a", "b"}  # equal points dominate nothing


def test_the_scatter_plot_is_a_png_of_every_variant(tmp_path):
    rows = [{**item, "pareto": item["variant"] in pareto_front(ROWS)} for item in ROWS]
    path = tmp_path / "pareto.png"
    save_pareto_plot(rows, select_variant(ROWS, CompressConfig()), path)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (760, 480)
        colours = {colour for _, colour in image.convert("RGB").getcolors(maxcolors=100_000)}
    assert (22, 150, 60) in colours  # the chosen variant's marker is drawn
    save_pareto_plot(rows[:1], select_variant(rows[:1], CompressConfig()), tmp_path / "one.png")  # one point: no crash
