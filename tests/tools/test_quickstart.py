"""tools/quickstart.py's own logic: result parsing, refusals, the results files.

The whole pipeline (five train_net runs and five COCO evaluations) takes minutes even with tiny
models, so it is run by hand (see the issue notes), not here.
"""
import argparse
import json
import math
import os

import pytest
import torch
from PIL import Image

from aqdetr_d2.experiments import ablation_table, runs, shapes_ablation

pytestmark = pytest.mark.usefixtures("quickstart_isolated")


def test_final_metrics_reads_the_last_evaluation(quickstart, tmp_path):
    lines = [{"iteration": 9, "total_loss": 3.0},
             {"iteration": 9, "bbox/AP": 10.0, "bbox/AP50": 20.0, "bbox/AP-circle": 5.0},
             {"iteration": 19, "bbox/AP": 30.5, "bbox/AP50": 50.0, "bbox/AP-circle": 25.0}]
    (tmp_path / "metrics.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert runs.final_metrics(str(tmp_path)) == {"AP": 30.5, "AP50": 50.0}


def test_missing_evaluation_is_refused(quickstart, tmp_path):
    with pytest.raises(SystemExit, match="no evaluation"):
        runs.final_metrics(str(tmp_path))  # no metrics.json at all
    (tmp_path / "model_final.pth").write_bytes(b"")
    assert not runs.finished(str(tmp_path), 400)
    (tmp_path / "metrics.json").write_text(json.dumps({"iteration": 1, "total_loss": 1.0}) + "\n")
    with pytest.raises(SystemExit, match="no evaluation"):
        runs.final_metrics(str(tmp_path))


def test_corrupt_teacher_is_refused(quickstart, tmp_path):
    bad = tmp_path / "teacher.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot be read"):
        quickstart.check_teacher(str(bad))
    torch.save({"model": {"transformer.weight": torch.zeros(1)}}, bad)
    with pytest.raises(SystemExit, match="not a detector checkpoint"):
        quickstart.check_teacher(str(bad))


def test_unwritable_dataset_directory_is_refused(quickstart, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(locked))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root ignores permission bits
    with pytest.raises(SystemExit, match="DETECTRON2_DATASETS"):
        quickstart.check_dataset_dir()


def _run(ap, seed):
    return {"AP": ap, "AP50": 2 * ap, "AP75": ap, "APs": ap, "APm": ap, "APl": float("nan"), "seed": seed,
            "train_minutes": 3.0 + seed, "output_dir": f"run{seed}"}


def test_mean_over_seeds(quickstart):
    row = ablation_table.mean_over_seeds([_run(40.0, 1), _run(43.0, 2)])
    assert row["AP"] == 41.5 and row["AP50"] == 83.0 and row["AP_spread"] == 3.0 and row["train_minutes"] == 4.5


def test_finished_runs_are_recognised(quickstart, tmp_path):
    assert not runs.finished(str(tmp_path), 400)
    (tmp_path / "model_final.pth").write_bytes(b"")
    (tmp_path / "metrics.json").write_text(json.dumps({"iteration": 199, "bbox/AP": 1.0}) + "\n")
    assert not runs.finished(str(tmp_path), 400)  # evaluated at another length
    assert runs.finished(str(tmp_path), 200)  # a periodic evaluation at the last step
    assert runs.finished(str(tmp_path), 199)  # the evaluation after training (EVAL_PERIOD 0)
    assert not runs.finished(str(tmp_path), 198)


def test_results_files(quickstart, tmp_path, capsys):
    teacher = {k: v for k, v in _run(70.0, 0).items() if k != "seed"}
    rows = [{"name": "teacher", "key": "teacher", **teacher, "size_mb": 16.0, "gops": 0.3}]
    rows += [{"name": name, "key": key, **ablation_table.mean_over_seeds(runs), "size_mb": 1.5, "gops": 0.05, "seeds": runs}
             for key, name, runs in [("lsq", "LSQ", [_run(40.0, 1), _run(42.0, 2)]), ("aq", "AQ-DETR", [_run(45.0, 1)])]]
    ablation_table.write_results(argparse.Namespace(output=str(tmp_path), arch="detr", precision="w4a4"), rows)
    table = (tmp_path / "results.md").read_text()
    assert "| teacher | `teacher` | 70.0 | 140.0 | 70.0 | - | - |" in table
    assert "| LSQ | `lsq` | 41.0 ± 1.4 | 82.0 ± 2.8 |" in table and "| 40.0 / 42.0 |" in table
    assert "| AQ-DETR | `aq` | 45.0 | 90.0 |" in table and "| within noise |" in table  # one seed: no spread, no claim
    assert "| LSQ | 41.0 | 41.0 | nan | 1.50 | 0.050 | 4.5 |" in table
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["rows"][2]["AP"] == 45.0 and results["args"]["precision"] == "w4a4"
    image = Image.open(tmp_path / "ablation.png")
    assert image.size[0] > 200 and image.size[1] > 150
    assert "| AQ-DETR | `aq` | 45.0 | 90.0 |" in capsys.readouterr().out


def test_numerics_of_each_run_reach_the_table(quickstart, tmp_path):
    avx512, avx2 = "CPU capability AVX512, no instruction caps, torch 2", "CPU capability AVX2, no instruction caps, torch 2"
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "log.txt").write_text(f"x\n[11/30 d2]: Numerics: {avx512}\ny\n[11/30 d2]: Numerics: {avx512}\n")
    (tmp_path / "b").mkdir()  # resumed on another machine
    (tmp_path / "b" / "log.txt").write_text(f"Numerics: {avx512}\nNumerics: {avx2}\n")
    assert quickstart.run_numerics(str(tmp_path / "a")) == [avx512]
    assert quickstart.run_numerics(str(tmp_path / "b")) == [avx512, avx2]
    assert quickstart.run_numerics(str(tmp_path / "missing")) == []

    teacher = {"name": "teacher", "numerics": [avx512]}
    lsq = {"name": "LSQ", "seeds": [{"seed": 1, "numerics": [avx512]}, {"seed": 2, "numerics": [avx512]}]}
    assert ablation_table.numerics_note([teacher, lsq]) == f"Numerics of every run: {avx512}."
    lsq["seeds"][1]["numerics"] = [avx512, avx2]
    lsq["seeds"].append({"seed": 3, "numerics": []})
    assert ablation_table.numerics_note([teacher, lsq]) == (
        f"Numerics per run: {avx512} (teacher, LSQ seed 1); {avx512}; then {avx2} (LSQ seed 2); "
        "not logged (LSQ seed 3).")


def test_evaluated_metrics_reads_the_copypaste_lines(quickstart, tmp_path):
    log = tmp_path / "run.log"
    log.write_text("[d2.evaluation.testing]: copypaste: Task: bbox\n"
                   "[d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl\n"
                   "[d2.evaluation.testing]: copypaste: 73.3066,93.4934,84.9689,72.3022,77.2350,nan\n")
    metrics = runs.evaluated_metrics(str(log))
    assert metrics["AP"] == 73.3066 and metrics["APm"] == 77.235 and metrics["APl"] != metrics["APl"]
    log.write_text("nothing evaluated\n")
    with pytest.raises(SystemExit, match="no COCO evaluation"):
        runs.evaluated_metrics(str(log))


def test_resume_reuses_only_an_evaluation_of_the_same_command(quickstart, tmp_path):
    log, run_dir = tmp_path / "ptq.log", str(tmp_path / "ptq")
    opts = ["--eval-only", "MODEL.WEIGHTS", "teacher.pth"]
    command = " ".join(runs.train_net_command("configs/a.yaml", run_dir, opts))
    evaluation = ("[d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl\n"
                  "[d2.evaluation.testing]: copypaste: 36.1,66.0,34.1,41.0,27.8,nan\n")
    assert runs.logged_evaluation("configs/a.yaml", run_dir, opts, str(log)) is None  # no log yet
    log.write_text(f"$ {command}\n" + evaluation)
    assert runs.logged_evaluation("configs/a.yaml", run_dir, opts, str(log))["AP"] == 36.1
    # Another checkpoint, config or output folder: evaluate again.
    assert runs.logged_evaluation("configs/a.yaml", run_dir, ["--eval-only", "MODEL.WEIGHTS", "other.pth"],
                                        str(log)) is None
    assert runs.logged_evaluation("configs/b.yaml", run_dir, opts, str(log)) is None
    # An evaluation that was interrupted before its metrics: evaluate again.
    log.write_text(f"$ {command}\nInference done 479/1000\n")
    assert runs.logged_evaluation("configs/a.yaml", run_dir, opts, str(log)) is None


def test_every_precision_has_student_configs(quickstart, project_root):
    for arch in quickstart.ARCHS.values():
        for precision in shapes_ablation.PRECISIONS:
            assert os.path.exists(os.path.join(project_root, arch["student"].format(p=precision))), (arch, precision)


def test_resume_keeps_the_rows_it_did_not_retrain(quickstart, tmp_path):
    def row(name, ap, seeds):
        return {"name": name, **ablation_table.mean_over_seeds([_run(ap, s) for s in seeds]), "size_mb": 1.5,
                "gops": 0.05, "seeds": [_run(ap, s) for s in seeds]}

    teacher = {"name": "teacher", "key": "teacher", **_run(70.0, 0), "size_mb": 16.0, "gops": 0.3}
    names = [quickstart.VARIANTS[k][0] for k in quickstart.VARIANTS]
    first = argparse.Namespace(output=str(tmp_path), arch="detr", precision="w4a4", resume=False)
    # Written as before rows had keys: the kept rows get theirs from their names.
    (tmp_path / "results.json").write_text(json.dumps(
        {"args": vars(first), "rows": [teacher] + [row(n, 40.0 + i, [1]) for i, n in enumerate(names)]}))

    # Seed 2 of LSQ and AQ-DETR only: the other rows come back from the first table, in order.
    lsq, aq = quickstart.VARIANTS["lsq"][0], quickstart.VARIANTS["aq"][0]
    second = argparse.Namespace(**{**vars(first), "resume": True})
    rows = ablation_table.with_previous_rows(second, [teacher, {**row(lsq, 50.0, [1, 2]), "key": "lsq"},
                                                  {**row(aq, 51.0, [1, 2]), "key": "aq"}])
    assert [r["name"] for r in rows] == ["teacher"] + names
    assert [r["key"] for r in rows] == ["teacher"] + list(quickstart.VARIANTS)
    retrained = {lsq: 50.0, aq: 51.0}
    assert [r["AP"] for r in rows] == [70.0] + [retrained.get(n, 40.0 + i) for i, n in enumerate(names)]
    assert [bool(r.get("kept")) for r in rows] == [False] + [n not in retrained for n in names]
    ablation_table.write_results(second, rows)
    kept = [n for n in names if n not in retrained]
    assert "Kept from the earlier run in this folder: " + ", ".join(kept) in (tmp_path / "results.md").read_text()

    # A table of another precision is not mixed in.
    other = argparse.Namespace(**{**vars(second), "precision": "w3a3"})
    assert [r["name"] for r in ablation_table.with_previous_rows(other, [teacher])] == ["teacher"]


def test_variants(quickstart):
    # By default the control (the teacher fine-tuned unquantized), LSQ and AQ-DETR.
    assert shapes_ablation.DEFAULT_VARIANTS == ["fp", "lsq", "aq"]
    flags = {k: v[1:] for k, v in quickstart.VARIANTS.items()}
    assert flags == {"fp": (False, False, False), "lsq": (True, False, False), "aux": (True, True, False),
                     "distill": (True, False, True), "aq": (True, True, True)}


def test_teacher_schedules(quickstart):
    def opts(arch, iters=None):
        values = quickstart.teacher_schedule(quickstart.ARCHS[arch], iters)
        return dict(zip(values[::2], values[1::2]))

    # Deformable-DETR: the schedule its committed teacher was trained with (docs/quickstart/deformable_teacher.yaml).
    assert opts("deformable") == {"SOLVER.MAX_ITER": "3500", "SOLVER.STEPS": "(3000,)", "TEST.EVAL_PERIOD": "700",
                                  "SOLVER.CHECKPOINT_PERIOD": "700"}
    # DETR: the committed teacher's schedule, two drops, evaluated 36 times for its curve.
    assert opts("detr") == {"SOLVER.MAX_ITER": "18000", "SOLVER.STEPS": "(6000, 12000,)", "TEST.EVAL_PERIOD": "500",
                            "SOLVER.CHECKPOINT_PERIOD": "500"}
    # --teacher-iters keeps the learning-rate drops at the same fractions of the run.
    assert opts("detr", 1800)["SOLVER.STEPS"] == "(600, 1200,)" and opts("detr", 1800)["TEST.EVAL_PERIOD"] == "50"


def test_fine_tunes_checkpoint_often_enough_to_resume():
    def opts(iters):
        values = shapes_ablation.fine_tune_opts("t.pth", "t.yaml", iters)
        return dict(zip(values[::2], values[1::2]))

    assert opts(1000)["SOLVER.CHECKPOINT_PERIOD"] == "200" and opts(1000)["SOLVER.STEPS"] == "(800,)"
    assert opts(20)["SOLVER.CHECKPOINT_PERIOD"] == "20"


def test_resume_continues_or_keeps_the_teacher(quickstart, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(quickstart, "train_net", lambda config, out, opts, log, on_line=None: calls.append((out, opts)) or 1.0)
    monkeypatch.setattr(quickstart, "check_teacher", lambda path: None)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    argv = ["quickstart.py", "--arch", "deformable", "--train-teacher", "--teacher-only", "--teacher-iters", "20",
            "--output", str(tmp_path)]
    teacher_dir = tmp_path / "teacher"

    monkeypatch.setattr("sys.argv", argv + ["--resume"])
    quickstart.main()  # nothing finished yet: train, continuing from any checkpoint in the folder
    # Its curve is evaluated on shapes_holdout, never on shapes_val.
    assert calls == [(str(teacher_dir), ["--resume", "DATASETS.TEST", "('shapes_holdout',)"])]

    teacher_dir.mkdir()
    (teacher_dir / "model_final.pth").write_bytes(b"")
    (teacher_dir / "metrics.json").write_text(json.dumps({"iteration": 19, "bbox/AP": 50.0}) + "\n")
    quickstart.main()  # finished at its schedule's last iteration: kept
    assert len(calls) == 1

    monkeypatch.setattr("sys.argv", argv)
    quickstart.main()  # without --resume, --train-teacher trains afresh
    assert calls[-1] == (str(teacher_dir), ["DATASETS.TEST", "('shapes_holdout',)"])


def test_runs_get_the_malloc_tunables_unless_the_user_set_their_own(quickstart, tmp_path, monkeypatch):
    envs = []

    class FakeRun:
        def __init__(self, cmd, env, **kwargs):
            envs.append(env)
            self.stdout = iter(["done\n"])

        def wait(self):
            return 0

    monkeypatch.setattr(runs.subprocess, "Popen", FakeRun)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    runs.train_net("configs/a.yaml", str(tmp_path), [], str(tmp_path / "a.log"))
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")
    runs.train_net("configs/a.yaml", str(tmp_path), [], str(tmp_path / "b.log"))
    assert [e["GLIBC_TUNABLES"] for e in envs] == [runs.MALLOC_TUNABLES, "glibc.malloc.arena_max=1"]
    assert envs[0]["PATH"] == os.environ["PATH"]  # the rest of the environment is passed on


def test_resume_with_fewer_seeds_keeps_the_other_runs_minutes(quickstart, tmp_path, monkeypatch):
    """Seeds 1 and 2, then seed 1 again (results.json rewritten without seed 2), then both: the
    kept seed-2 run still reports the minutes it took, not 0."""
    minutes = {"seed1": 5.0, "seed2": 7.0}

    def fake_train_net(config, out, opts, log_path, on_line=None):
        with open(log_path, "w") as log:
            log.write("copypaste: AP,AP50,AP75,APs,APm,APl\ncopypaste: 50.0,90.0,50.0,50.0,50.0,nan\n")
        if "--eval-only" in opts:
            return 1.0
        os.makedirs(out, exist_ok=True)
        open(os.path.join(out, "model_final.pth"), "wb").close()
        ap = 40.0 + float(opts[opts.index("SEED") + 1])
        with open(os.path.join(out, "metrics.json"), "w") as f:
            f.write(json.dumps({"iteration": 19, **{f"bbox/{k}": ap for k in runs.METRICS}}) + "\n")
        return minutes[os.path.basename(out).split("_")[1]] * 60

    monkeypatch.setattr(quickstart, "train_net", fake_train_net)
    monkeypatch.setattr(quickstart, "check_teacher", lambda path: None)
    monkeypatch.setattr(quickstart, "size_and_ops", lambda config, opts: (1.0, 0.1))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    base = ["quickstart.py", "--iters", "20", "--variants", "lsq", "--output", str(tmp_path)]

    def lsq_seed_minutes(seeds):
        monkeypatch.setattr("sys.argv", base + ["--resume", "--seeds", *seeds])
        quickstart.main()
        row = json.loads((tmp_path / "results.json").read_text())["rows"][-1]
        return {run["seed"]: run["train_minutes"] for run in row["seeds"]}

    assert lsq_seed_minutes(["1", "2"]) == {1: 5.0, 2: 7.0}
    minutes.update(seed1=6.0)  # would be the time if seed 1 were trained again; it is kept instead
    assert lsq_seed_minutes(["1"]) == {1: 5.0}
    assert lsq_seed_minutes(["1", "2"]) == {1: 5.0, 2: 7.0}
    # A finished run with no record anywhere (made by hand) reports no time rather than 0.
    (tmp_path / "lsq_seed2" / runs.MINUTES_FILE).unlink()
    (tmp_path / "results.json").unlink()
    assert math.isnan(lsq_seed_minutes(["1", "2"])[2])
