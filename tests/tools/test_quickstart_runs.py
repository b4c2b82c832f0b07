"""tools/quickstart.py's runs: picked configs, interpolated rows, parallel jobs (train_net and the
interpolation tool replaced by fakes that write what the quickstart reads)."""
import json
import os

import pytest

from aqdetr_d2.experiments import ablation_table, runs

pytestmark = pytest.mark.usefixtures("quickstart_isolated")


def _fake_fine_tunes_and_interpolation(quickstart, tmp_path, monkeypatch, calls):
    """train_net and the interpolation tool replaced by fakes that log AP 50 for a fine-tune and 60
    for an interpolated evaluation and write the files the quickstart checks; `calls` names each."""

    def fake_train_net(config, out, opts, log_path, on_line=None):
        calls.append(os.path.basename(out))
        ap = 60.0 if "interpolated" in out else 50.0
        with open(log_path, "w") as log:
            log.write(runs.log_header(runs.train_net_command(config, out, opts)))
            log.write(f"copypaste: AP,AP50,AP75,APs,APm,APl\ncopypaste: {ap},90.0,50.0,50.0,50.0,nan\n")
        if "--eval-only" not in opts:
            os.makedirs(out, exist_ok=True)
            open(os.path.join(out, "model_final.pth"), "wb").close()
            with open(os.path.join(out, "metrics.json"), "w") as f:
                f.write(json.dumps({"iteration": 19, **{f"bbox/{k}": ap for k in runs.METRICS}}) + "\n")
        return 60.0

    def fake_interpolate(cmd, log_path, failure):
        calls.append("interpolate")
        assert cmd[1] == quickstart.INTERPOLATE and cmd[cmd.index("--alpha") + 1] == "0.75"
        open(cmd[cmd.index("--output") + 1], "wb").close()
        return 1.0

    monkeypatch.setattr(quickstart, "train_net", fake_train_net)
    monkeypatch.setattr(quickstart, "run_logged", fake_interpolate)
    monkeypatch.setattr(quickstart, "check_teacher", lambda path: None)
    monkeypatch.setattr(quickstart, "size_and_ops", lambda config, opts: (1.0, 0.1))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))


def test_interpolate_adds_a_row_per_variant_and_resume_keeps_it(quickstart, tmp_path, monkeypatch):
    """`--interpolate 0.75`: each fine-tune is interpolated by tools/interpolate_weights.py and
    evaluated; the row follows its variant's; a `--resume` of the same command redoes neither."""
    calls = []
    _fake_fine_tunes_and_interpolation(quickstart, tmp_path, monkeypatch, calls)
    argv = ["quickstart.py", "--iters", "20", "--variants", "lsq", "aq", "--interpolate", "0.75", "--output", str(tmp_path)]
    monkeypatch.setattr("sys.argv", argv)
    quickstart.main()
    assert calls.count("interpolate") == 2 and calls.count("interpolated_0.75") == 2
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    aq = quickstart.VARIANTS["aq"][0]
    assert [r["name"] for r in rows[3:]] == ["LSQ", "LSQ, interpolated with its start (alpha 0.75)", aq,
                                             aq + ", interpolated with its start (alpha 0.75)"]
    assert [r["AP"] for r in rows[3:]] == [50.0, 60.0, 50.0, 60.0]
    assert [r["key"] for r in rows] == ["teacher", "ptq", "calibrated", "lsq", "lsq+interp", "aq", "aq+interp"]
    assert "calibrated" in calls  # evaluated, not trained (the fake trains nothing for --eval-only)
    assert rows[3]["seeds"][0]["output_dir"] == str(tmp_path / "lsq_seed1")

    calls.clear()
    monkeypatch.setattr("sys.argv", argv + ["--resume"])
    quickstart.main()
    assert "interpolate" not in calls and "interpolated_0.75" not in calls
    assert [r["AP"] for r in json.loads((tmp_path / "results.json").read_text())["rows"][3:]] == [50.0, 60.0, 50.0, 60.0]

    monkeypatch.setattr("sys.argv", argv[:-4] + ["--interpolate", "1.5", "--output", str(tmp_path)])
    with pytest.raises(SystemExit):
        quickstart.main()


def test_resume_drops_an_interpolated_row_whose_runs_changed(quickstart, tmp_path, monkeypatch):
    """A `--resume` without `--interpolate` keeps an earlier interpolated row only while it still
    describes its variant's runs: a retrained run or another seed list drops it."""
    calls = []
    _fake_fine_tunes_and_interpolation(quickstart, tmp_path, monkeypatch, calls)
    base = ["quickstart.py", "--iters", "20", "--output", str(tmp_path)]
    monkeypatch.setattr("sys.argv", base + ["--variants", "lsq", "aq", "--interpolate", "0.75"])
    quickstart.main()
    aq = quickstart.VARIANTS["aq"][0]
    names = lambda: [r["name"] for r in json.loads((tmp_path / "results.json").read_text())["rows"][3:]]
    aq_interpolated = ablation_table.interpolated_name(aq, 0.75)

    os.remove(tmp_path / "lsq_seed1" / "model_final.pth")  # LSQ seed 1 is trained again
    monkeypatch.setattr("sys.argv", base + ["--variants", "lsq", "aq", "--resume"])
    quickstart.main()
    assert names() == ["LSQ", aq, aq_interpolated]

    monkeypatch.setattr("sys.argv", base + ["--variants", "aq", "--seeds", "1", "2", "--resume"])
    quickstart.main()
    assert names() == ["LSQ", aq]


def test_picked_configs_replace_the_default_schedule(quickstart, tmp_path, monkeypatch, project_root):
    """--configs DIR: a variant with a picked config (tools/sweep.py) runs it as it is (SEED added);
    one without runs the student config with the quickstart's schedule."""
    picked = tmp_path / "picked"
    picked.mkdir()
    (picked / "detr_w4a4_aq.yaml").write_text(
        f'_BASE_: "{os.path.join(project_root, "configs", "shapes", "aqdetr_w4a4.yaml")}"\nSOLVER:\n  MAX_ITER: 30\n')
    calls = []

    def fake_train_net(config, out, opts, log_path, on_line=None):
        calls.append((os.path.basename(out), config, opts))
        with open(log_path, "w") as log:
            log.write("copypaste: AP,AP50,AP75,APs,APm,APl\ncopypaste: 50.0,90.0,50.0,50.0,50.0,nan\n")
        if "--eval-only" not in opts:
            os.makedirs(out, exist_ok=True)
            open(os.path.join(out, "model_final.pth"), "wb").close()
            iters = 30 if "aq" in out else 20
            with open(os.path.join(out, "metrics.json"), "w") as f:
                f.write(json.dumps({"iteration": iters, **{f"bbox/{k}": 50.0 for k in runs.METRICS}}) + "\n")
        return 60.0

    monkeypatch.setattr(quickstart, "train_net", fake_train_net)
    monkeypatch.setattr(quickstart, "check_teacher", lambda path: None)
    monkeypatch.setattr(quickstart, "size_and_ops", lambda config, opts: (1.0, 0.1))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    argv = ["quickstart.py", "--iters", "20", "--variants", "lsq", "aq", "--configs", str(picked),
            "--output", str(tmp_path / "out")]
    monkeypatch.setattr("sys.argv", argv)
    quickstart.main()
    runs_by_name = {name: (config, opts) for name, config, opts in calls}
    config, opts = runs_by_name["aq_seed1"]
    assert os.path.abspath(os.path.join(runs.ROOT, config)) == str(picked / "detr_w4a4_aq.yaml")
    assert opts == ["SOLVER.CHECKPOINT_PERIOD", "30", "SEED", "1"]  # resumable: at most every 200 iterations
    config, opts = runs_by_name["lsq_seed1"]
    assert config == "configs/shapes/aqdetr_w4a4.yaml" and runs.last_value(opts, "SOLVER.MAX_ITER", "") == "20"
    monkeypatch.setattr("sys.argv", argv + ["--resume"])
    calls.clear()
    quickstart.main()  # the picked run is recognised as finished at its own 30 iterations
    assert not [c for c in calls if c[0].endswith("_seed1")]


def test_parallel_jobs_give_the_same_table_on_a_share_of_the_cores(quickstart, tmp_path, monkeypatch):
    """--jobs 2 trains every fine-tune of --jobs 1, AQ-DETR's first (the slowest), each run told to
    use half the cores; the table is the same."""
    calls, threads = [], {}
    _fake_fine_tunes_and_interpolation(quickstart, tmp_path, monkeypatch, calls)
    fake = quickstart.train_net
    monkeypatch.setattr(quickstart, "train_net",
                        lambda *a, **k: threads.setdefault(jobs, set()).add(os.environ["OMP_NUM_THREADS"]) or fake(*a, **k))
    monkeypatch.setattr(quickstart.os, "cpu_count", lambda: 2)
    tables = {}
    for jobs in ("1", "2"):
        calls.clear()
        os.environ.pop("OMP_NUM_THREADS", None)  # a new process (the fixture restores it)
        out = tmp_path / f"jobs{jobs}"
        monkeypatch.setattr("sys.argv", ["quickstart.py", "--iters", "20", "--seeds", "1", "2", "--jobs", jobs,
                                         "--output", str(out)])
        quickstart.main()
        fine_tunes = [c for c in calls if "_seed" in c]
        assert sorted(fine_tunes) == sorted(f"{k}_seed{s}" for k in ("fp", "lsq", "aq") for s in (1, 2))
        assert fine_tunes[0].startswith("aq_")
        rows = json.loads((out / "results.json").read_text())["rows"]
        tables[jobs] = [(r["key"], r["AP"], [run["seed"] for run in r.get("seeds", [])]) for r in rows]
    assert tables["1"] == tables["2"]
    assert [key for key, _, _ in tables["1"]] == ["teacher", "ptq", "calibrated", "fp", "lsq", "aq"]
    assert threads == {"1": {"2"}, "2": {"1"}}  # 2 cores over the jobs, evaluations included


def test_interpolate_from_a_sweep_uses_each_variants_picked_alpha(quickstart, tmp_path, monkeypatch):
    calls, alphas = [], []
    _fake_fine_tunes_and_interpolation(quickstart, tmp_path, monkeypatch, calls)

    def fake_interpolate(cmd, log_path, failure):
        alphas.append((os.path.basename(os.path.dirname(cmd[cmd.index("--fine-tuned") + 1])),
                       cmd[cmd.index("--alpha") + 1]))
        open(cmd[cmd.index("--output") + 1], "wb").close()
        return 1.0

    monkeypatch.setattr(quickstart, "run_logged", fake_interpolate)
    sweep_json = tmp_path / "sweep.json"
    sweep_json.write_text(json.dumps({"picked": {"lsq": {"trial": "lsq_1", "interpolation": {"alpha": 0.75}},
                                                 "aq": {"trial": "aq_1", "interpolation": {"alpha": 0.5}},
                                                 "aux": {"trial": "aux_1"},
                                                 "fp": {"trial": "fp_1", "interpolation": {"alpha": 1.0}}}}))
    monkeypatch.setattr("sys.argv", ["quickstart.py", "--iters", "20", "--variants", "fp", "lsq", "aq",
                                     "--interpolate-from", str(sweep_json), "--output", str(tmp_path / "out")])
    quickstart.main()
    # The control's alpha 1 is the fine-tune itself: neither interpolated nor evaluated again.
    assert sorted(alphas) == [("aq_seed1", "0.5"), ("lsq_seed1", "0.75")]
    assert "interpolated_1" not in calls
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["key"] for r in rows[3:]] == ["fp", "lsq", "lsq+interp", "aq", "aq+interp"]
    assert rows[7]["name"] == ablation_table.interpolated_name(quickstart.VARIANTS["aq"][0], 0.5)
    monkeypatch.setattr("sys.argv", ["quickstart.py", "--interpolate", "0.5", "--interpolate-from", str(sweep_json)])
    with pytest.raises(SystemExit):
        quickstart.main()


def test_control_from_an_earlier_grid_is_reused_not_trained(quickstart, tmp_path, monkeypatch):
    """`--control-from` takes the fp rows of another precision's results.json, marked with their
    source, instead of training the control again; another schedule or seeds is refused."""
    calls = []
    _fake_fine_tunes_and_interpolation(quickstart, tmp_path, monkeypatch, calls)
    monkeypatch.setattr("sys.argv", ["quickstart.py", "--iters", "20", "--variants", "fp", "lsq",
                                     "--output", str(tmp_path / "w4a4")])
    quickstart.main()
    earlier = str(tmp_path / "w4a4" / "results.json")
    control = next(r for r in json.loads(open(earlier).read())["rows"] if r["key"] == "fp")

    calls.clear()
    argv = ["quickstart.py", "--iters", "20", "--precision", "w2a2", "--variants", "lsq", "--control-from", earlier,
            "--output", str(tmp_path / "w2a2")]
    monkeypatch.setattr("sys.argv", argv)
    quickstart.main()
    assert "fp_seed1" not in calls and "lsq_seed1" in calls
    rows = json.loads((tmp_path / "w2a2" / "results.json").read_text())["rows"]
    assert [r["key"] for r in rows] == ["teacher", "ptq", "calibrated", "fp", "lsq"]
    assert rows[3] == {**control, "from": earlier}
    assert f"Taken from `{earlier}` (--control-from): {control['name']}." in (tmp_path / "w2a2" / "results.md").read_text()

    for wrong in (["--seeds", "1", "2"], ["--iters", "30"]):
        monkeypatch.setattr("sys.argv", argv + wrong)
        with pytest.raises(SystemExit, match="its control was made with"):
            quickstart.main()
    monkeypatch.setattr("sys.argv", argv[:6] + ["fp"] + argv[6:])
    with pytest.raises(SystemExit):
        quickstart.main()
    monkeypatch.setattr("sys.argv", argv[:-3] + [str(tmp_path / "missing.json")] + argv[-2:])
    with pytest.raises(SystemExit, match="not a results.json"):
        quickstart.main()


def _committed_log(ap: float) -> str:
    """What a finished fine-tune's Detectron2 log holds that --runs-from reads."""
    return ("[12/07 09:26:00 aqdetr_d2]: Numerics: CPU capability AVX512, no instruction caps, torch 2.14.1, 1 thread\n"
            "[12/07 09:56:39 d2.engine.hooks]: Overall training speed: 998 iterations in 0:10:00 (0.6012 s / it)\n"
            "[12/07 09:57:01 d2.evaluation.evaluator]: Total inference time: 0:00:30.000000 (0.03 s / iter per device)\n"
            "[12/07 09:57:02 d2.evaluation.testing]: copypaste: Task: bbox\n"
            "[12/07 09:57:02 d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl\n"
            f"[12/07 09:57:02 d2.evaluation.testing]: copypaste: {ap},90.0,50.0,50.0,50.0,nan\n")


def test_runs_from_a_committed_folder_are_taken_not_trained(quickstart, tmp_path, monkeypatch):
    """`--runs-from DIR` takes a fine-tune that tools/collect_runs.py committed (config and log)
    instead of training it: its final AP, minutes and numerics from the log. A run committed with
    other settings is refused with the key named; an unfinished one is trained here."""
    calls, dumps = [], {}
    _fake_fine_tunes_and_interpolation(quickstart, tmp_path, monkeypatch, calls)
    committed = tmp_path / "committed"
    committed.mkdir()
    argv = ["quickstart.py", "--variants", "lsq", "--seeds", "1", "2", "--runs-from", str(committed)]
    # The configs the runs would train with, as train_net would dump them: from a first call.
    real = quickstart.committed_run
    monkeypatch.setattr(quickstart, "committed_run", lambda folder, run, dump: dumps.setdefault(run, dump) and None)
    monkeypatch.setattr("sys.argv", argv + ["--output", str(tmp_path / "first")])
    quickstart.main()
    monkeypatch.setattr(quickstart, "committed_run", real)
    for run, dump in dumps.items():
        (committed / f"{run}_config.yaml").write_text(dump)
    (committed / "lsq_seed1_log.txt").write_text(_committed_log(44.5))
    (committed / "lsq_seed2_log.txt").write_text(_committed_log(44.5).split("Overall")[0])  # interrupted

    calls.clear()
    monkeypatch.setattr("sys.argv", argv + ["--output", str(tmp_path / "out")])
    quickstart.main()
    assert "lsq_seed1" not in calls and "lsq_seed2" in calls
    seeds = json.loads((tmp_path / "out" / "results.json").read_text())["rows"][3]["seeds"]
    assert [s["AP"] for s in seeds] == [44.5, 50.0]
    assert seeds[0]["train_minutes"] == pytest.approx(10.5) and seeds[0]["from"] == str(committed / "lsq_seed1_log.txt")
    assert seeds[0]["numerics"] == ["CPU capability AVX512, no instruction caps, torch 2.14.1, 1 thread"]

    (committed / "lsq_seed1_config.yaml").write_text(dumps["lsq_seed2"])  # seed 2's config under seed 1's name
    monkeypatch.setattr("sys.argv", argv + ["--output", str(tmp_path / "again")])
    with pytest.raises(SystemExit, match="SEED"):
        quickstart.main()
