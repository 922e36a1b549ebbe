"""The Pareto front of the variants and the policy that picks the one to ship.

The policy: a variant qualifies when its accuracy on the full test set is at most `compress.max_accuracy_drop`
below fp32's and it is not in `compress.exclude_from_selection`; fp32 always qualifies (its drop is 0). Among the
qualifying ones the best by `compress.objective` ships: lowest batch-1 p50 latency, highest batch-64 throughput, or
smallest file; ties go to the more accurate, then the smaller. So fp32 ships when no compressed variant qualifies,
and also when it is itself the fastest (tiny models, where int8's quantize/dequantize steps cost more than they
save). Speed is what this machine's CPU measured in this run, the same for every variant.
"""

from __future__ import annotations

from typing import Any

from kiln.config import CompressConfig

FP32 = "fp32"
ACCURACY_EPSILON = 1e-9  # accuracies are k/n fractions: don't let float rounding flip an exact-budget decision
OBJECTIVES = {  # objective -> (report column, True when larger is better, words for the reason)
    "latency": ("p50_ms", False, "the lowest batch-1 p50 latency"),
    "throughput": ("throughput_ips", True, "the highest batch-64 throughput"),
    "size": ("size_bytes", False, "the smallest file"),
}
# Why a variant is excluded by default (CompressConfig.exclude_from_selection), for the selection record.
EXCLUSION_WHY = {
    "fp16": "it is built for GPU serving, and the policy ranks by CPU measurements, which do not represent it",
}
# What the report says about a variant besides its numbers: the caveats a reader needs.
VARIANT_NOTES = {
    "fp32": "the exported model: the reference for accuracy drop and agreement",
    "int8_static": "int8 weights and activations (QDQ), activation ranges calibrated on training images",
    "int8_dynamic": "int8 weights of the linear layers, activations quantized per batch at run time; convolutions "
    "stay float (suits linear-heavy models such as mlp)",
    "fp16": "for GPU serving: onnxruntime's CPU provider has few fp16 kernels, so these CPU figures do not "
    "represent it",
    "prune_structured": "channels removed and layers rebuilt smaller, then fine-tuned: fewer weights and fewer "
    "multiply-accumulates, faster dense inference",
    "prune_unstructured": "individual weights zeroed (global magnitude), then fine-tuned: the file compresses "
    "better (gzip_size_bytes), but dense kernels still multiply by the zeros, so it is no faster",
    "distill": "a smaller student trained on the teacher's soft targets",
    "distill_int8": "the distilled student, quantized like int8_static",
}


def pareto_front(rows: list[dict[str, Any]]) -> set[str]:
    """Variants no other variant beats on both accuracy (higher) and batch-1 p50 latency (lower)."""

    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        at_least = a["accuracy"] >= b["accuracy"] and a["p50_ms"] <= b["p50_ms"]
        return at_least and (a["accuracy"] > b["accuracy"] or a["p50_ms"] < b["p50_ms"])

    return {row["variant"] for row in rows if not any(dominates(other, row) for other in rows)}


def select_variant(rows: list[dict[str, Any]], config: CompressConfig) -> dict[str, Any]:
    """The variant to ship, per the policy above, with the reason and every variant's verdict.

    `rows` are report rows with at least variant, file, accuracy, size_bytes and the objective's column; one must
    be fp32. Returns {"chosen", "file", "stage" (export for fp32, else compress), "reason", "objective",
    "max_accuracy_drop", "fp32_accuracy", "accuracy_drop", "candidates", "rejected": {variant: why}}.
    """
    by_variant = {row["variant"]: row for row in rows}
    fp32 = by_variant[FP32]
    budget = config.max_accuracy_drop
    column, larger_is_better, objective_words = OBJECTIVES[config.objective]
    rejected: dict[str, str] = {}
    candidates = [fp32]
    for row in rows:
        if row["variant"] == FP32:
            continue
        drop = fp32["accuracy"] - row["accuracy"]
        if row["variant"] in config.exclude_from_selection:
            why = EXCLUSION_WHY.get(row["variant"])
            rejected[row["variant"]] = "listed in compress.exclude_from_selection" + (f": {why}" if why else "")
        elif drop > budget + ACCURACY_EPSILON:
            rejected[row["variant"]] = f"accuracy drop {drop:.4f} exceeds compress.max_accuracy_drop {budget}"
        else:
            candidates.append(row)

    def rank(row: dict[str, Any]) -> tuple:
        value = row[column]
        return (-value if larger_is_better else value, -row["accuracy"], row["size_bytes"])

    chosen = min(candidates, key=rank)
    drop = fp32["accuracy"] - chosen["accuracy"]
    selection = {
        "chosen": chosen["variant"],
        "file": chosen.get("file"),
        "stage": "export" if chosen["variant"] == FP32 else "compress",  # the fp32 model lives in the export output
        "reason": _reason(chosen, fp32, candidates, rejected, config, column, objective_words),
        "objective": config.objective,
        "max_accuracy_drop": budget,
        "fp32_accuracy": fp32["accuracy"],
        "accuracy_drop": round(drop, 6),
        "candidates": [row["variant"] for row in candidates],
        "rejected": rejected,
    }
    return selection


def _reason(chosen, fp32, candidates, rejected, config: CompressConfig, column: str, objective_words: str) -> str:
    if len(candidates) == 1 and not rejected:
        return (
            "No compressed variant was built (compress.variants is empty, or compress.method=none), so the fp32 "
            "model ships."
        )
    if len(candidates) == 1:
        why = "; ".join(f"{name}: {problem}" for name, problem in rejected.items())
        return f"No compressed variant qualifies ({why}), so the fp32 model ships (accuracy {fp32['accuracy']:.4f})."
    unit = {"p50_ms": " ms", "throughput_ips": " images/s", "size_bytes": " bytes"}[column]
    others = ", ".join(
        f"{row['variant']} {row[column]:,}{unit}" for row in candidates if row["variant"] != chosen["variant"]
    )
    within = (
        f"among the {len(candidates)} qualifying variants, those within {config.max_accuracy_drop} of fp32's "
        f"accuracy {fp32['accuracy']:.4f} and not excluded (the others: {others})"
    )
    if chosen["variant"] == FP32:
        return (
            f"fp32 itself has {objective_words} ({fp32[column]:,}{unit}) {within}: no compressed variant beats it "
            "on this machine, so the fp32 model ships."
        )
    drop = fp32["accuracy"] - chosen["accuracy"]
    factor = chosen[column] / fp32[column] if column == "throughput_ips" else fp32[column] / max(chosen[column], 1e-12)
    better = "faster" if column != "size_bytes" else "smaller"
    return (
        f"{chosen['variant']} has {objective_words} ({chosen[column]:,}{unit}, {factor:.2f}x {better} than fp32) "
        f"{within}; its accuracy {chosen['accuracy']:.4f} is {abs(drop):.4f} {'below' if drop >= 0 else 'above'} "
        "fp32's."
    )
