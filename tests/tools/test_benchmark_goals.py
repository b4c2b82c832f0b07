"""benchmarks/goals.py: issue 27's speed goals read from a results file."""
import json
import os

from train_net_helpers import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _goals_module():
    # benchmarks/ is a folder of scripts, not a package.
    return load_script(os.path.join(ROOT, "benchmarks", "goals.py"), "goals")


def _results(device, rows):
    return {"device": device, "models": [{"model": name, "train_ratio": train, "eval_ratio": evaluation}
                                         for name, train, evaluation in rows]}


def test_each_row_is_met_or_missed_by_its_distance_to_the_limit():
    goals = _goals_module()
    results = _results("cpu", [("DETR float", 1.0, 1.0), ("DETR LSQ W4A4A4", 1.5, 1.0),
                               ("Deformable-DETR LSQ W4A4A4", 1.25, 1.06)])
    table = goals.goals_markdown(results).splitlines()
    assert "| shapes LSQ train | DETR LSQ W4A4A4 | 1.50x | 1.30x | missed by 0.20x |" in table
    assert "| shapes LSQ train | Deformable-DETR LSQ W4A4A4 | 1.25x | 1.30x | met |" in table
    assert "| shapes quantized eval | DETR LSQ W4A4A4 | 1.00x | 1.05x | met |" in table
    assert "| shapes quantized eval | Deformable-DETR LSQ W4A4A4 | 1.06x | 1.05x | missed by 0.01x |" in table
    # Rows that were not measured (no AQ-DETR, no R50 here) are left out, not reported as met.
    assert not any("AQ-DETR" in line or "R50" in line for line in table)


def test_goals_are_per_device():
    goals = _goals_module()
    rows = [("DETR LSQ W4A4A4", 1.4, 1.1)]
    assert "CUDA" not in goals.goals_markdown(_results("cpu", rows))
    cuda = goals.goals_markdown(_results("cuda", rows))
    assert "| CUDA LSQ train | DETR LSQ W4A4A4 | 1.40x | 1.50x | met |" in cuda
    assert goals.goals_markdown(_results("cpu", [("DETR float", 1.0, 1.0)])) == ""


def test_every_cpu_goal_row_is_a_row_the_benchmark_writes():
    """The goals name rows as benchmarks/run.py --r50 names them (the committed run had them all)."""
    goals = _goals_module()
    with open(os.path.join(ROOT, "benchmarks", "results.json")) as f:
        measured = {r["model"] for r in json.load(f)["models"]}
    for goal in goals.GOALS:
        if goal.device == "cpu":
            assert set(goal.rows) <= measured, goal.name
