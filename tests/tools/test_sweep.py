"""tools/sweep.py: the same budget per variant, holdout-only trials, the pick, resume, picked configs."""
import argparse
import json
import os

import pytest

from aqdetr_d2.config import load_config
from aqdetr_d2.experiments import runs
from train_net_helpers import load_script


@pytest.fixture(scope="module")
def sweep(project_root):
    return load_script(os.path.join(project_root, "tools", "sweep.py"), "sweep_tool")


SPACE = """
shared:
  SOLVER.BASE_LR: [1.0e-5, 2.0e-5, 5.0e-5]
  ema: [{MODEL_EMA.ENABLED: False}, {MODEL_EMA.ENABLED: True, MODEL_EMA.DECAY: 0.99}]
variants:
  aux:
    MODEL.AUX_QUERIES.LOSS_WEIGHT: [0.5, 1.0]
  aq:
    inherit: [aux]
    MODEL.DISTILL.ENC_ATTN_WEIGHT: [0.0, 1.0]
"""


def _finished_run(out, opts, ap):
    """What a finished fine-tune leaves for the sweep: its final model and its last evaluation."""
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "model_final.pth"), "wb").close()
    iters = int(runs.last_value(opts, "SOLVER.MAX_ITER", "0"))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        f.write(json.dumps({"iteration": iters, **{f"bbox/{k}": ap for k in runs.METRICS}}) + "\n")
    return 60.0


def _fake_runs(sweep, monkeypatch, calls):
    """train_net replaced: holdout AP grows with the learning rate and the aux weight."""
    def fake_train_net(config, out, opts, log_path):
        calls.append((out, opts))
        assert "shapes_val" not in " ".join(opts)
        ap = 100 * float(runs.last_value(opts, "SOLVER.BASE_LR", "0")) * 1000 + float(
            runs.last_value(opts, "MODEL.AUX_QUERIES.LOSS_WEIGHT", "0"))
        return _finished_run(out, opts, ap)

    monkeypatch.setattr(sweep, "train_net", fake_train_net)


def test_every_variant_gets_the_budget_on_holdout_and_the_best_is_picked(sweep, tmp_path, monkeypatch, make_cfg):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    calls = []
    _fake_runs(sweep, monkeypatch, calls)
    out = tmp_path / "sweep"
    argv = ["--space", str(space), "--precision", "w2a2", "--variants", "lsq", "aux", "aq", "--budget", "4",
            "--iters", "20", "--output", str(out), "--write-configs", str(tmp_path / "picked"),
            "--config-precisions", "w2a2", "w4a4"]
    sweep.main(argv)
    result = json.loads((out / "sweep.json").read_text())
    per_variant = {v: [t for t in result["trials"] if t["variant"] == v] for v in ("lsq", "aux", "aq")}
    assert {v: len(t) for v, t in per_variant.items()} == {"lsq": 4, "aux": 4, "aq": 4}
    for trial in result["trials"]:
        opts = trial["train_opts"]
        assert runs.last_value(opts, "DATASETS.TEST", "") == "('shapes_holdout',)"
        assert runs.last_value(opts, "SEED", "") == "1"
    # aq tunes the shared knobs, aux's (inherited) and its own.
    assert {k for t in per_variant["aq"] for k in t["opts"][::2]} >= {"SOLVER.BASE_LR", "MODEL_EMA.ENABLED",
                                                                      "MODEL.AUX_QUERIES.LOSS_WEIGHT"}
    for variant, trials in per_variant.items():
        best = max(trials, key=lambda t: t["holdout"]["AP"])
        assert result["picked"][variant]["trial"] == best["trial"]
    # The same draw again: same trials, and --resume trains none of them.
    calls.clear()
    sweep.main(argv + ["--resume"])
    assert calls == []
    assert json.loads((out / "sweep.json").read_text())["trials"] == result["trials"]
    assert "recorded_opts" not in json.loads((out / "sweep.json").read_text())["args"]
    # A kept trial keeps the options it was recorded with, even where the tool's defaults moved since.
    recorded = json.loads((out / "sweep.json").read_text())
    recorded["trials"][0]["train_opts"] += ["SOLVER.CHECKPOINT_PERIOD", "1000"]
    (out / "sweep.json").write_text(json.dumps(recorded))
    sweep.main(argv + ["--resume"])
    assert json.loads((out / "sweep.json").read_text())["trials"][0]["train_opts"][-2:] == [
        "SOLVER.CHECKPOINT_PERIOD", "1000"]

    # A picked config alone gives train_net the trial's settings (given SEED, OUTPUT_DIR, test set).
    trial = next(t for t in result["trials"] if t["trial"] == result["picked"]["aq"]["trial"])
    picked = load_config(str(tmp_path / "picked" / "detr_w2a2_aq.yaml"))
    from_opts = load_config(os.path.join(runs.ROOT, "configs", "shapes", "aqdetr_w2a2.yaml"), trial["train_opts"])
    assert picked.SOLVER.CHECKPOINT_PERIOD != from_opts.SOLVER.CHECKPOINT_PERIOD  # left to the caller
    picked.merge_from_list(["SEED", "1", "DATASETS.TEST", "('shapes_holdout',)",
                            "SOLVER.CHECKPOINT_PERIOD", str(from_opts.SOLVER.CHECKPOINT_PERIOD)])
    assert picked.dump() == from_opts.dump()
    # The same settings for another precision: that precision's student config underneath.
    other = load_config(str(tmp_path / "picked" / "detr_w4a4_aq.yaml"))
    assert (other.MODEL.QUANT.WEIGHT_BITS, picked.MODEL.QUANT.WEIGHT_BITS) == (4, 2)
    assert other.SOLVER.BASE_LR == picked.SOLVER.BASE_LR


def test_status_lists_finished_trials_and_runs_nothing(sweep, tmp_path, monkeypatch):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    calls = []
    _fake_runs(sweep, monkeypatch, calls)
    out = tmp_path / "sweep"
    argv = ["--space", str(space), "--variants", "aux", "--budget", "3", "--iters", "20", "--output", str(out)]
    args = argparse.Namespace(variants=["aux"], budget=3, draw_seed=0, output=str(out), seed=1, iters=20)
    todo = sweep.method_trials(args, sweep.load_space(str(space)))
    # One trial finished with AP 12.5, one trained part-way, one not started.
    teacher = os.path.join("docs", "quickstart", "detr_teacher")
    done_dir, done_opts, _ = sweep.trial_plan(args, sweep.fine_tune_opts(teacher + ".pth", teacher + ".yaml", 20),
                                              *todo[0])
    _finished_run(done_dir, done_opts, 12.5)
    os.makedirs(os.path.join(str(out), sweep.trial_name(*todo[1])))
    sweep.main(argv + ["--status"])
    assert calls == [] and not (out / "sweep.json").exists()
    rows = [line for line in (out / "sweep_status.md").read_text().splitlines() if line.startswith("| aux |")]
    assert len(rows) == 3
    assert f"| {os.path.basename(done_dir)} |" in rows[0] and "| 12.50 | 12.50 | 12.50 |" in rows[0]
    assert all("not finished" in row for row in rows[1:])


def test_bad_spaces_are_refused(sweep, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("variants:\n  fancy:\n    SOLVER.BASE_LR: [1.0]\n")
    with pytest.raises(SystemExit, match="unknown variant 'fancy'"):
        sweep.load_space(str(space))
    space.write_text("shared:\n  SOLVER.BASE_LR: 1.0\n")
    with pytest.raises(SystemExit, match="non-empty list"):
        sweep.load_space(str(space))


def test_draws_are_fixed_and_without_replacement(sweep):
    space = {"shared": {"A": [1, 2, 3], "B": [{"C": 1}, {"C": 2, "D": 3}]}}
    first = sweep.draw_trials(space, "lsq", 4, 0)
    assert first == sweep.draw_trials(space, "lsq", 4, 0) and len({json.dumps(t) for t in first}) == 4
    assert len(sweep.draw_trials(space, "lsq", 100, 0)) == 6  # the whole product when it is smaller
    assert ["A", "2", "C", "2", "D", "3"] in sweep.draw_trials(space, "lsq", 100, 0)


def test_the_schedule_is_the_best_for_the_students_among_those_the_control_holds(sweep, tmp_path, monkeypatch):
    """fp stays within 0.5 AP of the teacher only at the two smaller learning rates; LSQ is best at
    the largest: the pick is the best LSQ point among those that hold, and stage two uses it."""
    space = tmp_path / "space.yaml"
    space.write_text("shared:\n  SOLVER.BASE_LR: [1.0e-5, 2.0e-5, 5.0e-5]\n"
                     "variants:\n  aux:\n    MODEL.AUX_QUERIES.LOSS_WEIGHT: [0.5, 1.0]\n")
    calls = []

    def fake_train_net(config, out, opts, log_path):
        calls.append((out, opts))
        lr = float(runs.last_value(opts, "SOLVER.BASE_LR", "0"))
        if "--eval-only" in opts:  # the teacher on holdout
            with open(log_path, "w") as log:
                log.write(runs.log_header(runs.train_net_command(config, out, opts)))
                log.write("copypaste: AP,AP50,AP75,APs,APm,APl\ncopypaste: 60.0,90.0,70.0,60.0,60.0,nan\n")
            return 1.0
        quantized = runs.last_value(opts, "MODEL.QUANT.ENABLED", "") == "True"
        ap = 40.0 + lr * 1e5 if quantized else 60.0 - (lr > 3e-5) * 2.0 + lr * 1e4
        return _finished_run(out, opts, ap)

    monkeypatch.setattr(sweep, "train_net", fake_train_net)
    stage_one = tmp_path / "schedule"
    sweep.main(["--space", str(space), "--variants", "lsq", "--control", "fp", "--budget", "3", "--iters", "20",
                "--output", str(stage_one), "--write-configs", str(tmp_path / "picked"),
                "--results", str(tmp_path / "committed")])
    assert not (stage_one / "sweep.json").exists()  # the table goes where --results says
    stage_one = tmp_path / "committed"
    picked = json.loads((stage_one / "sweep.json").read_text())["picked"]
    assert picked["teacher_holdout_AP"] == 60.0
    assert picked["schedule"]["opts"] == ["SOLVER.BASE_LR", "2e-05"]
    assert [p["holds"] for p in sorted(picked["points"], key=lambda p: p["opts"][1])] == [True, True, False]
    table = (stage_one / "sweep.md").read_text()
    assert "| `SOLVER.BASE_LR 5e-05` | -1.50 | no |" in table and "Picked schedule: `SOLVER.BASE_LR 2e-05`" in table
    marked = [line.split(" | ")[1] for line in table.splitlines() if line.endswith("| yes |")]
    assert marked == [sweep.trial_name(v, ["SOLVER.BASE_LR", "2e-05"]) for v in ("fp", "lsq")]
    # The control and LSQ on the picked schedule become configs, as stage two's picks do.
    for variant, quantized in (("fp", False), ("lsq", True)):
        cfg = load_config(str(tmp_path / "picked" / f"detr_w4a4_{variant}.yaml"))
        assert (cfg.SOLVER.BASE_LR, cfg.MODEL.QUANT.ENABLED, cfg.SOLVER.MAX_ITER) == (2e-5, quantized, 20)
        assert "committed/sweep.json" in (tmp_path / "picked" / f"detr_w4a4_{variant}.yaml").read_text()

    calls.clear()
    sweep.main(["--space", str(space), "--variants", "aux", "--budget", "2", "--iters", "20",
                "--schedule-from", str(stage_one / "sweep.json"), "--output", str(tmp_path / "methods")])
    assert len(calls) == 2 and all(runs.last_value(o, "SOLVER.BASE_LR", "") == "2e-05" for _, o in calls)


def test_parallel_jobs_run_the_same_trials_on_a_share_of_the_cores(sweep, tmp_path, monkeypatch):
    """--jobs 2 runs every trial of the sequential sweep (same settings, same table order, same
    pick), each train_net told to use half the cores."""
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "unset")
    monkeypatch.delenv("OMP_NUM_THREADS")  # restored after the test, as the sweep sets it
    results, threads = {}, set()
    for jobs in (1, 2):
        calls = []
        _fake_runs(sweep, monkeypatch, calls)
        if jobs == 2:
            fake = sweep.train_net
            monkeypatch.setattr(sweep, "train_net", lambda *a: threads.add(os.environ.get("OMP_NUM_THREADS")) or fake(*a))
        out = tmp_path / f"jobs{jobs}"
        sweep.main(["--space", str(space), "--variants", "lsq", "aux", "--budget", "3", "--iters", "20",
                    "--output", str(out), "--jobs", str(jobs)])
        result = json.loads((out / "sweep.json").read_text())
        results[jobs] = ([(t["trial"], t["opts"], t["holdout"]["AP"]) for t in result["trials"]], result["picked"])
        assert len(calls) == 6
        if jobs == 2:  # the slower variant's trials start first
            assert [os.path.basename(out).split("_")[0] for out, _ in calls[:2]] == ["aux", "aux"]
    assert results[1] == results[2]
    assert threads == {"1"}


def test_each_quantized_pick_gets_the_alpha_best_on_holdout(sweep, tmp_path, monkeypatch):
    """--alphas: each quantized variant's pick is interpolated with its start at every alpha and
    evaluated on holdout; the best alpha is picked (here 0.75 for aux, 0.5 for lsq); the control
    gets none. The same with two jobs."""
    space = tmp_path / "space.yaml"
    space.write_text("variants:\n  aux:\n    MODEL.AUX_QUERIES.LOSS_WEIGHT: [0.5, 1.0]\n")
    best_alpha = {"lsq": "0.5", "aux": "0.75"}

    def fake_train_net(config, out, opts, log_path):
        if "--eval-only" not in opts:
            return _finished_run(out, opts, 50.0)
        variant = os.path.basename(os.path.dirname(out)).split("_")[0]
        alpha = os.path.basename(out).split("_")[1]
        assert runs.last_value(opts[1:], "DATASETS.TEST", "") == "('shapes_holdout',)"  # after --eval-only
        ap = 60.0 if alpha == best_alpha[variant] else 55.0
        with open(log_path, "w") as log:
            log.write(runs.log_header(runs.train_net_command(config, out, opts)))
            log.write(f"copypaste: AP,AP50,AP75,APs,APm,APl\ncopypaste: {ap},90.0,70.0,60.0,60.0,nan\n")
        return 1.0

    def fake_interpolate(cmd, log_path, failure):
        open(cmd[cmd.index("--output") + 1], "wb").close()
        return 1.0

    monkeypatch.setattr(sweep, "train_net", fake_train_net)
    monkeypatch.setattr(sweep, "run_logged", fake_interpolate)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for jobs in ("1", "2"):
        out = tmp_path / f"jobs{jobs}"
        sweep.main(["--space", str(space), "--variants", "fp", "lsq", "aux", "--budget", "2", "--iters", "20",
                    "--alphas", "0.5", "0.75", "1.0", "--output", str(out), "--jobs", jobs])
        picked = json.loads((out / "sweep.json").read_text())["picked"]
        assert "interpolation" not in picked["fp"]
        for variant, alpha in best_alpha.items():
            assert picked[variant]["interpolation"]["alpha"] == float(alpha)
            assert picked[variant]["interpolation"]["holdout_AP"] == {
                a: (60.0 if a == alpha else 55.0) for a in ("0.5", "0.75", "1")}
