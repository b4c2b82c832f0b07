#!/usr/bin/env python
"""Pick one of several finished fine-tunes by their AP on shapes_holdout (never shapes_val).

    python tools/pick_on_holdout.py output/grid_w4a4/{lsq,aux,distill,aq}_seed{1,2,3} \\
        --output docs/experiments/detr_grid_w4a4/holdout_pick.json

Each run folder (a train_net.py OUTPUT_DIR with config.yaml and model_final.pth) is evaluated with
`train_net.py --eval-only` on its own config, DATASETS.TEST ('shapes_holdout',), into
`<run>/holdout` (log `<run>/holdout.log`; an existing log of the same command is read instead of
evaluating again). The model zoo takes its DETR entries this way: the grid's table on shapes_val is
the evaluation, so choosing a model by it would make that model's shapes_val AP optimistic. Writes
`--output` (every run's holdout metrics, and the pick: the highest AP) and prints the table.
"""
import argparse
import json
import os
import sys

from aqdetr_d2.experiments.runs import HOLDOUT, evaluated_metrics, logged_evaluation, stage, train_net


def holdout_metrics(run_dir: str) -> dict:
    """COCO metrics of `run_dir`'s final model on shapes_holdout (evaluated once, then read back)."""
    config, weights = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "model_final.pth")
    for path in (config, weights):
        if not os.path.isfile(path):
            sys.exit(f"{run_dir} is not a finished run: {os.path.basename(path)} is missing")
    eval_dir, opts = os.path.join(run_dir, "holdout"), ["--eval-only", "MODEL.WEIGHTS", weights, *HOLDOUT]
    metrics = logged_evaluation(config, eval_dir, opts, eval_dir + ".log")
    if metrics is None:
        train_net(config, eval_dir, opts, eval_dir + ".log")
        metrics = evaluated_metrics(eval_dir + ".log")
    stage(f"{run_dir}: holdout AP {metrics['AP']:.2f}")
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished train_net.py output folders")
    parser.add_argument("--output", required=True, metavar="FILE.json", help="where the holdout table and pick go")
    args = parser.parse_args(argv)
    rows = [{"run": os.path.normpath(run), "holdout": holdout_metrics(run)} for run in args.runs]
    pick = max(rows, key=lambda r: r["holdout"]["AP"])
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"command": "python tools/pick_on_holdout.py " + " ".join(sys.argv[1:] if argv is None else argv),
                   "runs": rows, "pick": pick["run"]}, f, indent=2)
    print("| run | holdout AP | AP50 | AP75 |\n|---|---|---|---|")
    for r in rows:
        m = r["holdout"]
        print(f"| {r['run']}{' (pick)' if r is pick else ''} | {m['AP']:.2f} | {m['AP50']:.2f} | {m['AP75']:.2f} |")


if __name__ == "__main__":
    main()
