"""Ablation results (`results.json` of tools/quickstart.py): per-seed statistics, the pairing rule
for claims, and the markdown tables that README.md and docs/ show.

A results file is {"args": {"arch", "precision", ...}, "rows": [row, ...]}; a row has "name",
"key" (`ROW_KEYS`, "+interp" appended for a row interpolated with its start), the COCO metrics
(its seeds' mean for a trained row) and, for a trained row, "seeds": one dict of metrics per
seed with "seed".
"""
import json
import math
import statistics
from typing import Dict, List, Sequence

from ..experiments.shapes_ablation import PRECISIONS

# Row key -> what the row is, in table order.
ROW_KEYS = {
    "teacher": "full-precision teacher",
    "fp": "control: the teacher fine-tuned unquantized on the students' schedule",
    "ptq": "PTQ min-max (no training)",
    "calibrated": "calibrated start (LSQ quantizers initialised, no training)",
    "lsq": "LSQ",
    "aux": "LSQ + auxiliary queries",
    "distill": "LSQ + distillation",
    "aq": "AQ-DETR (auxiliary queries + distillation)",
    "qdetr": "Q-DETR",
}
INTERP = "+interp"
# Keys of rows that involve no training, shown without seeds.
UNTRAINED = ("teacher", "ptq", "calibrated")


def load_results(path: str) -> dict:
    with open(path) as f:
        results = json.load(f)
    for row in results["rows"]:
        if row.get("key", "").replace(INTERP, "") not in ROW_KEYS:
            raise ValueError(f"{path}: row {row.get('name')!r} has key {row.get('key')!r}; expected one of "
                             f"{sorted(ROW_KEYS)}, optionally with {INTERP!r}")
    return results


def seed_values(row: dict, metric: str = "AP") -> Dict[int, float]:
    return {int(s["seed"]): float(s[metric]) for s in row.get("seeds", [])}


def mean_std(values: Sequence[float]):
    """(mean, sample standard deviation; 0 for one value)."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_differences(row: dict, baseline: dict, metric: str = "AP") -> List[float]:
    """`row` minus `baseline` per seed, over the seeds both have, in seed order."""
    a, b = seed_values(row, metric), seed_values(baseline, metric)
    return [a[s] - b[s] for s in sorted(a.keys() & b.keys())]


def paired_claim(row: dict, baseline: dict, metric: str = "AP") -> str:
    """"gain", "loss" or "within noise" for `row` against `baseline`, over the seeds both have.

    A difference counts only when every paired per-seed difference has the same sign and their
    mean exceeds twice their standard deviation; fewer than two shared seeds never count.
    """
    diffs = paired_differences(row, baseline, metric)
    if len(diffs) < 2:
        return "within noise"
    mean, std = mean_std(diffs)
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    if same_sign and abs(mean) > 2 * std:
        return "gain" if mean > 0 else "loss"
    return "within noise"


def _fmt(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.1f}"


def ap_cell(row: dict, metric: str = "AP") -> str:
    """"57.6" for an untrained row or a single seed (no spread to show); "54.1 ± 0.5" (mean ± std
    over seeds) for a row trained with several."""
    values = list(seed_values(row, metric).values())
    if len(values) < 2:
        return _fmt(values[0] if values else row[metric])
    mean, std = mean_std(values)
    return f"{_fmt(mean)} ± {std:.1f}"


def rows_table(results: dict, baseline_key: str = "lsq") -> str:
    """One results file as a markdown table: per row AP (mean ± std), AP50, AP75, each seed's AP,
    and the paired claim against the `baseline_key` row."""
    rows = results["rows"]
    baseline = next((r for r in rows if r["key"] == baseline_key), None)
    lines = [f"| run | key | AP | AP50 | AP75 | AP per seed | vs {ROW_KEYS.get(baseline_key, baseline_key)} |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        seeds = seed_values(row)
        per_seed = " / ".join(f"{v:.1f}" for _, v in sorted(seeds.items())) or "-"
        claim = "-"
        if baseline is not None and seeds and row is not baseline and row["key"] not in UNTRAINED:
            claim = paired_claim(row, baseline)
        lines.append(f"| {row['name']} | `{row['key']}` | {ap_cell(row)} | {ap_cell(row, 'AP50')} | "
                     f"{ap_cell(row, 'AP75')} | {per_seed} | {claim} |")
    return "\n".join(lines)


def pairs_table(results: dict, pairs: Sequence[str]) -> str:
    """Paired comparisons of one results file, each "row_key:baseline_key" (e.g. "aq:aux") or
    "row_key:baseline_key:METRIC" (default AP): the per-seed differences over the seeds both rows
    have, their mean ± std, and `paired_claim`."""
    rows = {row["key"]: row for row in results["rows"]}
    lines = ["| comparison | metric | difference per seed | mean ± std | claim |", "|---|---|---|---|---|"]
    for pair in pairs:
        key, base, metric = (pair.split(":") + ["AP"])[:3]
        if key not in rows or base not in rows:
            raise KeyError(f"pair {pair!r}: the results have no row {key if key not in rows else base!r}")
        diffs = paired_differences(rows[key], rows[base], metric)
        mean, std = mean_std(diffs) if diffs else (float("nan"), 0.0)
        lines.append(f"| {rows[key]['name']} vs {rows[base]['name']} | {metric} | "
                     f"{' / '.join(f'{d:+.1f}' for d in diffs) or '-'} | {mean:+.1f} ± {std:.1f} | "
                     f"{paired_claim(rows[key], rows[base], metric)} |")
    return "\n".join(lines)


def grid_table(results_list: List[dict]) -> str:
    """Several results files (one per precision) side by side: one row per key, AP mean ± std."""
    columns = [PRECISIONS.get(r["args"]["precision"], r["args"]["precision"].upper()) for r in results_list]
    by_key: List[Dict[str, dict]] = [{row["key"]: row for row in r["rows"]} for r in results_list]
    keys = [key for base in ROW_KEYS for key in (base, base + INTERP) if any(key in rows for rows in by_key)]
    lines = ["| run | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for key in keys:
        base = key.replace(INTERP, "")
        name = ROW_KEYS[base] + (", interpolated with its start" if key.endswith(INTERP) else "")
        cells = [ap_cell(rows[key]) if key in rows else "-" for rows in by_key]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# What a rerun is compared on.
RERUN_METRICS = ("AP", "AP50", "AP75")


def rerun_table(rerun: dict, reference: dict, tolerance: float = 0.5) -> str:
    """A rerun (e.g. the quickstart on seed 1) against the results it should reproduce: per row of
    `rerun`, AP / AP50 / AP75 beside the reference row with the same key (the same seed's values
    for a trained row), the largest absolute difference, and whether it is within `tolerance`."""
    reference_rows = {row["key"]: row for row in reference["rows"]}
    lines = ["| run | key | seed | AP | AP50 | AP75 | largest difference | within " + f"{tolerance:g} AP |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rerun["rows"]:
        if row["key"] not in reference_rows:
            raise KeyError(f"the reference results have no row {row['key']!r}")
        ref_row = reference_rows[row["key"]]
        for run in row.get("seeds") or [row]:
            seed = run.get("seed")
            ref = ref_row if seed is None else next((s for s in ref_row.get("seeds", []) if s["seed"] == seed), None)
            if ref is None:
                raise KeyError(f"the reference row {row['key']!r} has no seed {seed}")
            cells = [f"{run[m]:.2f} / {ref[m]:.2f}" for m in RERUN_METRICS]
            largest = max(abs(run[m] - ref[m]) for m in RERUN_METRICS)
            lines.append(f"| {row['name']} | `{row['key']}` | {'-' if seed is None else seed} | " + " | ".join(cells)
                         + f" | {largest:.2f} | {'yes' if largest <= tolerance else 'no'} |")
    return "\n".join(lines)


def zoo_table(entries: List[dict]) -> str:
    """Markdown table of model-zoo entries (docs/models/<name>/metrics.json of tools/zoo_entry.py)."""
    lines = ["| model | arch | precision | AP | AP50 | AP75 | integer AP | ORT AP | file MB | ORT latency vs float | weights |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in sorted(entries, key=lambda e: e["name"]):
        folder = f"docs/models/{e['name']}"
        onnx = e.get("onnx") or {}
        latency = (f"{onnx['latency_s'] * 1e3:.0f} / {onnx['float_latency_s'] * 1e3:.0f} ms "
                   f"({onnx['latency_s'] / onnx['float_latency_s']:.2f}x)") if onnx else "-"
        ort_ap = f"{onnx['AP']:.1f}" if "AP" in onnx else "-"
        integer_ap = f"{e['integer']['AP']:.1f}" if "integer" in e else "-"
        lines.append(f"| [{e['name']}]({folder}/config.yaml) | {e['meta_architecture']} | {e['precision']} | "
                     f"{e['AP']:.1f} | {e['AP50']:.1f} | {e['AP75']:.1f} | {integer_ap} | {ort_ap} | {e['model_mb']:.2f} | {latency} | "
                     f"[model.pth]({folder}/model.pth) |")
    return "\n".join(lines)
