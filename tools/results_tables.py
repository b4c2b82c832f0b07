#!/usr/bin/env python
"""Write every results table of README.md and docs/ from the committed results.json files.

    python tools/results_tables.py           # rewrite the tables in place
    python tools/results_tables.py --check   # exit 1 if a committed table differs from what it would write

A table is the text between a marker naming its source and `<!-- /results-table -->`:

    <!-- results-table: rows docs/experiments/detr_grid_w4a4/results.json -->
    <!-- results-table: grid docs/experiments/detr_grid_w4a4/results.json docs/experiments/detr_grid_w3a3/results.json -->
    <!-- results-table: pairs docs/experiments/detr_grid_w4a4/results.json aq:aux aq:distill aux:lsq:AP50 -->
    <!-- results-table: zoo docs/models -->
    <!-- results-table: rerun docs/experiments/detr_quickstart_check/results.json docs/experiments/detr_grid_w4a4/results.json -->

"rows" shows one results file (every row, mean ± std over seeds, each seed, and the paired
claim against LSQ); "pairs" compares rows of one file other than against LSQ ("row:baseline"
keys, or "row:baseline:METRIC" for another metric than AP: the per-seed differences and the paired
claim); "grid" puts several side by side, one
column per precision; "rerun" sets a rerun (the quickstart's seed 1) beside the rows of the
results it should reproduce, AP / AP50 / AP75 each, within 0.5 AP or not; "zoo" lists
every model-zoo entry of a folder (its <name>/metrics.json, from tools/zoo_entry.py). Paths are
relative to the repository root. Tables are never typed by hand.
"""
import argparse
import glob
import json
import os
import re
import sys

from aqdetr_d2.utils.results import (grid_table, load_results, pairs_table, rerun_table, rows_table,
                                   zoo_table)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"(<!-- results-table: (rows|pairs|grid|rerun|zoo) ([^>]+?) -->\n)(.*?)(<!-- /results-table -->)", re.S)
# How each kind of table is made from its results files.
TABLES = {"rows": lambda results: rows_table(results[0]), "grid": grid_table,
          "rerun": lambda results: rerun_table(*results)}
# How many results files a kind takes (None: any number).
FILES = {"rows": 1, "rerun": 2, "grid": None}


def zoo_entries(folder: str):
    """The metrics.json of every entry under `folder`, by entry name."""
    entries = []
    for path in sorted(glob.glob(os.path.join(folder, "*", "metrics.json"))):
        with open(path) as f:
            entries.append(json.load(f))
    return entries


def documents(root: str = ROOT):
    return [os.path.join(root, "README.md"), *sorted(glob.glob(os.path.join(root, "docs", "**", "*.md"),
                                                                recursive=True))]


def render(text: str, root: str = ROOT) -> str:
    """`text` with every marked table regenerated."""
    def table(match):
        kind, paths = match.group(2), match.group(3).split()
        if kind == "zoo":
            return match.group(1) + zoo_table(zoo_entries(os.path.join(root, paths[0]))) + "\n" + match.group(5)
        if kind == "pairs":
            return match.group(1) + pairs_table(load_results(os.path.join(root, paths[0])), paths[1:]) + "\n" + match.group(5)
        if FILES[kind] is not None and len(paths) != FILES[kind]:
            raise ValueError(f"a {kind} table names {FILES[kind]} results file(s), got {paths}")
        results = [load_results(os.path.join(root, p)) for p in paths]
        return match.group(1) + TABLES[kind](results) + "\n" + match.group(5)

    return MARKER.sub(table, text)


def main(argv=None, root: str = ROOT) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when a table is stale")
    args = parser.parse_args(argv)
    stale = []
    for path in documents(root):
        if not os.path.exists(path):
            continue
        with open(path) as f:
            text = f.read()
        try:
            new = render(text, root)
        except (OSError, ValueError, KeyError) as e:
            print(f"{os.path.relpath(path, root)}: {e}", file=sys.stderr)
            return 2
        if new != text:
            stale.append(os.path.relpath(path, root))
            if not args.check:
                with open(path, "w") as f:
                    f.write(new)
    verb = "differ from the results files" if args.check else "rewritten"
    print(f"tables {verb}: {', '.join(stale)}" if stale else "every results table is up to date")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
