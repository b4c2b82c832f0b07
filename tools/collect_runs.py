#!/usr/bin/env python
"""Copy what a sweep or quickstart folder holds that a reader needs into a committed folder.

    python tools/collect_runs.py output/sweep_schedule docs/experiments/detr_schedule_sweep_w4a4
    python tools/collect_runs.py output/grid_w4a4 docs/experiments/detr_grid_w4a4

From SOURCE: the tables (results.json / results.md / ablation.png of tools/quickstart.py,
sweep.json / sweep.md of tools/sweep.py) and, for every run folder (one holding Detectron2's
`config.yaml` and `log.txt`), those two as `<run>_config.yaml` and `<run>_log.txt`; interpolated
evaluations inside a run folder come along as `<run>_<evaluation>_log.txt`. Checkpoints,
event files and evaluation caches stay behind. Only finished runs (with `model_final.pth`, or
evaluation-only runs) are copied; an unfinished one is named and skipped.
"""
import argparse
import os
import shutil

TABLES = ("results.json", "results.md", "ablation.png", "sweep.json", "sweep.md")


def run_folders(source: str):
    """(name, path) of every Detectron2 run folder directly under `source`, sorted by name."""
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if os.path.isfile(os.path.join(path, "config.yaml")) and os.path.isfile(os.path.join(path, "log.txt")):
            yield name, path


def finished(path: str) -> bool:
    """A training run that wrote its final model, or an evaluation-only run (which writes no event
    file and no checkpoint: a training run has its event file from its first iteration)."""
    files = os.listdir(path)
    training = any(f.startswith("events.out.tfevents") or f.endswith(".pth") or f == "metrics.json" for f in files)
    return "model_final.pth" in files or not training


def collect(source: str, destination: str) -> list:
    """Copy the tables and the finished runs' configs and logs; returns the files written."""
    if not os.path.isdir(source):
        raise SystemExit(f"{source} is not a folder")
    os.makedirs(destination, exist_ok=True)
    written = []

    def copy(src, name):
        shutil.copyfile(src, os.path.join(destination, name))
        written.append(name)

    for table in TABLES:
        if os.path.isfile(os.path.join(source, table)):
            copy(os.path.join(source, table), table)
    for name, path in run_folders(source):
        if not finished(path):
            print(f"skipped {path}: not finished")
            continue
        copy(os.path.join(path, "config.yaml"), f"{name}_config.yaml")
        copy(os.path.join(path, "log.txt"), f"{name}_log.txt")
        for inner, inner_path in run_folders(path):
            copy(os.path.join(inner_path, "log.txt"), f"{name}_{inner}_log.txt")
    return written


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a --output folder of tools/sweep.py or tools/quickstart.py")
    parser.add_argument("destination", help="the committed folder, e.g. docs/experiments/<arch>_<precision>_<recipe>")
    args = parser.parse_args()
    written = collect(args.source, args.destination)
    print(f"{len(written)} files written to {args.destination}")


if __name__ == "__main__":
    main()
