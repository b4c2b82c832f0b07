"""Issue 27's speed goals, checked against a `benchmarks/run.py` results file.

Each goal names the rows it applies to, the ratio it reads (a step or an eval against the
float model of the same run) and its limit; `goals_markdown` writes one line per measured row:
met, or missed by how much. Why a goal is missed (which ops hold it back) is in
docs/benchmarks.md, from the profiles.
"""
from dataclasses import dataclass
from typing import Sequence

_LSQ = "LSQ W4A4A4"
_AQ = "W4A4A4 + aux queries + distillation"
_SHAPES = ("DETR", "Deformable-DETR")
_R50 = ("DETR-R50", "Deformable-DETR-R50")


@dataclass(frozen=True)
class Goal:
    name: str
    device: str  # the results' device the goal is for ("cpu" / "cuda")
    rows: Sequence[str]  # model names of the rows it applies to
    ratio: str  # "train_ratio" or "eval_ratio" of those rows
    limit: float  # at most this many times the float model's time


GOALS = (
    Goal("shapes LSQ train", "cpu", [f"{a} {_LSQ}" for a in _SHAPES], "train_ratio", 1.3),
    Goal("shapes AQ-DETR train", "cpu", [f"{a} {_AQ}" for a in _SHAPES], "train_ratio", 1.6),
    Goal("shapes quantized eval", "cpu", [f"{a} {v}" for a in _SHAPES for v in (_LSQ, _AQ)], "eval_ratio", 1.05),
    Goal("R50 LSQ train", "cpu", [f"{a} {_LSQ}{o}" for a in _R50 for o in ("", ", frozen stages' step sizes fixed")],
         "train_ratio", 1.2),
    Goal("R50 AQ-DETR train", "cpu", [f"{a} {_AQ}" for a in _R50], "train_ratio", 1.5),
    Goal("CUDA LSQ train", "cuda", [f"{a} {_LSQ}" for a in _SHAPES + _R50], "train_ratio", 1.5),
    Goal("CUDA quantized eval", "cuda", [f"{a} {v}" for a in _SHAPES + _R50 for v in (_LSQ, _AQ)], "eval_ratio", 1.2),
)


def goal_rows(results: dict, goals=GOALS):
    """(goal, model row, measured ratio) for every goal row present in `results`."""
    by_name = {r["model"]: r for r in results.get("models", [])}
    return [(goal, by_name[name], by_name[name][goal.ratio]) for goal in goals
            if goal.device == results["device"] for name in goal.rows if name in by_name]


def goals_markdown(results: dict, goals=GOALS) -> str:
    """Issue 27's goals against this run; empty when none of its rows was measured."""
    rows = goal_rows(results, goals)
    if not rows:
        return ""
    lines = ["| goal | model | measured | limit | |", "|---|---|---|---|---|"]
    for goal, row, measured in rows:
        verdict = "met" if measured <= goal.limit else f"missed by {measured - goal.limit:.2f}x"
        lines.append(f"| {goal.name} | {row['model']} | {measured:.2f}x | {goal.limit:.2f}x | {verdict} |")
    return "\n".join(lines)
