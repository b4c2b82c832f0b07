"""The quickstart's results table: rows averaged over seeds, rows kept from an earlier run in the
same folder (--resume), and the files written (results.json / results.md / ablation.png)."""
import json
import math
import os
import sys

from ..utils.results import INTERP
from .runs import METRICS, recorded_minutes, stage
from .shapes_ablation import VARIANTS

# What an interpolated row's name adds to its variant's; rows are matched to variants by it.
INTERPOLATED = ", interpolated with its start"


def previous_results(output: str) -> dict:
    """The results.json an earlier quickstart wrote to `output` ({} if none or unreadable)."""
    try:
        with open(os.path.join(output, "results.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def previous_minutes(output: str, run_dir: str) -> float:
    """The training minutes recorded for the finished run in `run_dir`: its own record, else
    (runs from before records were kept) the earlier results.json in `output`, else NaN, which
    the table prints as "nan" rather than a time nobody measured."""
    minutes = recorded_minutes(run_dir)
    if not math.isnan(minutes):
        return minutes
    rows = previous_results(output).get("rows", [])
    runs = [run for row in rows for run in row.get("seeds", []) if run["output_dir"] == run_dir]
    return runs[0]["train_minutes"] if runs else float("nan")


def control_rows(path: str, args) -> list:
    """The control rows (`fp`, and its interpolated row if any) of the earlier quickstart's
    results.json at `path`, each marked "from": `path`. The control is the teacher fine-tuned
    unquantized, so it does not depend on --precision: a grid at another precision on the same
    schedule reuses it instead of training it again. Exits with a clear message when `path` was
    made with another architecture, seeds, configs, iterations or --opts, or holds no control."""
    try:
        with open(path) as f:
            earlier = json.load(f)
        made_with, rows = earlier["args"], earlier["rows"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"--control-from {path}: not a results.json of tools/quickstart.py ({e!r})")
    for field in ("arch", "seeds", "configs", "iters", "opts"):
        if made_with.get(field) != getattr(args, field):
            raise SystemExit(f"--control-from {path}: its control was made with {field} "
                             f"{made_with.get(field)!r}, this run has {getattr(args, field)!r}; "
                             "train the control here instead (--variants fp)")
    rows = [{**row, "from": path} for row in rows if row.get("key") in ("fp", "fp" + INTERP)]
    if not rows:
        raise SystemExit(f"--control-from {path}: it has no control row (key 'fp'); train it here (--variants fp)")
    return rows


def interpolated_name(name: str, alpha: float) -> str:
    return f"{name}{INTERPOLATED} (alpha {alpha:g})"


def _key_of(name: str) -> str:
    """The row key of a variant row named `name` (for results.json files written before rows had keys)."""
    base, interpolated, _ = name.partition(INTERPOLATED)
    key = next(k for k, v in VARIANTS.items() if v[0] == base)
    return key + (INTERP if interpolated else "")


def with_previous_rows(args, rows, retrained=frozenset()):
    """`rows` plus the ablation rows an earlier run in `--output` finished and this one did not
    train (e.g. `--resume --seeds 1 2 --variants lsq aq` after all four variants with seed 1),
    in table order; each kept row is marked "kept": True. Rows of another --arch / --precision
    are not mixed in. An earlier interpolated row of a variant in `rows` is kept only while it
    still describes that row's runs: the same seeds, none of them in `retrained` (run folders
    this call trained)."""
    previous = previous_results(args.output)
    if not previous or (previous["args"].get("arch"), previous["args"].get("precision")) != (args.arch, args.precision):
        return rows
    trained = {r["name"]: r for r in rows}
    kept = {}
    for row in previous["rows"]:
        if "seeds" not in row or row["name"] in trained:
            continue
        base = trained.get(row["name"].partition(INTERPOLATED)[0]) if INTERPOLATED in row["name"] else None
        seed_runs = _seed_runs(row)
        if base is not None and (seed_runs != _seed_runs(base) or {d for _, d in seed_runs} & retrained):
            stage(f"dropped the earlier row \"{row['name']}\": its runs changed since; "
                  "--interpolate evaluates it again")
            continue
        kept[row["name"]] = {"key": _key_of(row["name"]), **row, "kept": True}
    by_name = {**kept, **{r["name"]: r for r in rows}}
    order = [r["name"] for r in rows if "seeds" not in r]
    for key in VARIANTS:
        name = VARIANTS[key][0]
        order += [name, *sorted(n for n in by_name if n.startswith(name + INTERPOLATED))]
    return [by_name[name] for name in order if name in by_name]


def _seed_runs(row):
    return [(run["seed"], run.get("output_dir")) for run in row["seeds"]]


def mean_over_seeds(runs):
    """Metrics and training minutes averaged over per-seed runs; `AP_spread` is max - min AP."""
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in (*METRICS, "train_minutes")}
    aps = [r["AP"] for r in runs]
    return {**mean, "AP_spread": max(aps) - min(aps)}


def numerics_note(rows) -> str:
    """One line saying under which CPU instructions the runs of `rows` were made: runs match
    each other's digits only under the same ones (aqdetr_d2.utils.numerics)."""
    runs = {}
    for r in rows:
        for run in r.get("seeds", [r]):
            label = r["name"] + (f" seed {run['seed']}" if "seed" in run else "")
            runs[label] = "; then ".join(run.get("numerics", [])) or "not logged"
    distinct = list(dict.fromkeys(runs.values()))
    if len(distinct) == 1:
        return f"Numerics of every run: {distinct[0]}."
    return "Numerics per run: " + "; ".join(
        f"{value} ({', '.join(k for k, v in runs.items() if v == value)})" for value in distinct) + "."


def write_results(args, rows):
    from ..utils.charts import ablation_bar_chart
    from ..utils.results import rows_table

    results = {"args": vars(args), "rows": rows}
    lines = [f"Command: `python tools/quickstart.py {' '.join(sys.argv[1:])}`", "", rows_table(results), "",
             "| run | APs | APm | APl | size (MB) | GOPs | train (min) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r[k]:.1f}" for k in ("APs", "APm", "APl"))
                     + f" | {r['size_mb']:.2f} | {r['gops']:.3f} | {r['train_minutes']:.1f} |")
    kept = [r["name"] for r in rows if r.get("kept")]
    if kept:
        lines += ["", "Kept from the earlier run in this folder: " + ", ".join(kept) + "."]
    for source in dict.fromkeys(r["from"] for r in rows if r.get("from")):
        taken = [r["name"] for r in rows if r.get("from") == source]
        lines += ["", f"Taken from `{source}` (--control-from): " + ", ".join(taken) + "."]
    lines += ["", numerics_note(rows)]
    table = "\n".join(lines)
    with open(os.path.join(args.output, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.output, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    ablation_bar_chart(rows, "AP", os.path.join(args.output, "ablation.png"))
    print(table)
