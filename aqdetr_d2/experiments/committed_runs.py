"""Finished fine-tunes kept in the repository instead of a run folder.

`tools/collect_runs.py` copies each finished run's Detectron2 config and log into a committed folder
(`<run>_config.yaml`, `<run>_log.txt`). A grid that a machine loss interrupted can take those runs
from there (`tools/quickstart.py --runs-from DIR`) and train only the rest: the table needs each
run's final evaluation, which its log holds, and nothing of its checkpoint (unless the run is to
be interpolated with its start).
"""
import os
import re
from datetime import timedelta
from typing import Optional

import yaml

from .runs import copypaste_metrics, logged_numerics

# Config keys that name files of the machine that made the run: they may differ from this one's.
MACHINE_PATHS = ("OUTPUT_DIR", "MODEL.WEIGHTS", "MODEL.DISTILL.TEACHER_WEIGHTS", "MODEL.DISTILL.TEACHER_CONFIG")
_TRAINED = re.compile(r"Overall training speed: \d+ iterations in ([\d:]+)")
_INFERENCE = re.compile(r"Total inference time: ([\d:.]+)")


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _duration(text: str) -> timedelta:
    hours, minutes, seconds = text.split(":")
    return timedelta(hours=int(hours), minutes=int(minutes), seconds=float(seconds))


def config_differences(committed_yaml: str, expected_dump: str) -> list:
    """The config keys (machine paths aside) whose values differ between a committed run's config
    and the dump of the config this run would train with."""
    committed, expected = _flat(yaml.safe_load(committed_yaml)), _flat(yaml.safe_load(expected_dump))
    keys = (set(committed) | set(expected)) - set(MACHINE_PATHS)
    return sorted(k for k in keys if committed.get(k) != expected.get(k))


def committed_run(folder: str, run: str, expected_dump: str) -> Optional[dict]:
    """Run `run` (e.g. "lsq_seed2") as `folder` holds it: its final COCO metrics, training
    minutes (training and final evaluation, from the log) and numerics lines; None when `folder`
    has no finished run of that name. Exits with the keys named when the committed run was made
    with another config than `expected_dump`, the one this run would train with."""
    log_path, config_path = (os.path.join(folder, f"{run}_{suffix}") for suffix in ("log.txt", "config.yaml"))
    if not (os.path.isfile(log_path) and os.path.isfile(config_path)):
        return None
    with open(log_path) as f:
        lines = f.readlines()
    trained = [i for i, line in enumerate(lines) if _TRAINED.search(line)]
    metrics = copypaste_metrics(lines[trained[-1]:]) if trained else None
    if metrics is None:
        return None  # interrupted before its final evaluation
    with open(config_path) as f:
        differences = config_differences(f.read(), expected_dump)
    if differences:
        raise SystemExit(f"{config_path} was trained with other settings than this run ({', '.join(differences[:5])}"
                         f"{' ...' if len(differences) > 5 else ''}): drop --runs-from, or use the same configs")
    took = _duration(_TRAINED.search(lines[trained[-1]]).group(1))
    took += sum((_duration(m.group(1)) for m in map(_INFERENCE.search, lines[trained[-1]:]) if m), timedelta())
    return {**metrics, "train_minutes": took.total_seconds() / 60, "numerics": logged_numerics(lines),
            "from": log_path}
