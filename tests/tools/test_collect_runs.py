"""tools/collect_runs.py: tables and finished runs' configs and logs, nothing else."""
import os

import pytest

from train_net_helpers import load_script


@pytest.fixture(scope="module")
def collect_runs(project_root):
    return load_script(os.path.join(project_root, "tools", "collect_runs.py"), "collect_runs")


def _run(folder, *files):
    os.makedirs(folder, exist_ok=True)
    for name in ("config.yaml", "log.txt", *files):
        with open(os.path.join(folder, name), "w") as f:
            f.write(name)


def test_copies_tables_and_finished_runs_only(collect_runs, tmp_path):
    source = tmp_path / "output"
    _run(source / "lsq_seed1", "model_final.pth", "model_0000999.pth", "metrics.json")
    _run(source / "lsq_seed1" / "interpolated_0.75")  # an evaluation inside the run
    _run(source / "calibrated")  # evaluation only: no checkpoint
    _run(source / "aq_seed1", "model_0000499.pth")  # interrupted
    _run(source / "aux_seed1", "events.out.tfevents.1.vm", "metrics.json")  # before its first checkpoint
    (source / "results.json").write_text("{}")
    (source / "notes.txt").write_text("not a table")
    written = collect_runs.collect(str(source), str(tmp_path / "docs"))
    assert sorted(written) == ["calibrated_config.yaml", "calibrated_log.txt", "lsq_seed1_config.yaml",
                               "lsq_seed1_interpolated_0.75_log.txt", "lsq_seed1_log.txt", "results.json"]
    assert sorted(os.listdir(tmp_path / "docs")) == sorted(written)
    assert (tmp_path / "docs" / "lsq_seed1_log.txt").read_text() == "log.txt"
    with pytest.raises(SystemExit, match="is not a folder"):
        collect_runs.collect(str(tmp_path / "missing"), str(tmp_path / "docs"))
