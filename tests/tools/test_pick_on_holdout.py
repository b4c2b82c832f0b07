"""tools/pick_on_holdout.py: each run's holdout evaluation, read back once made, and the pick."""
import json
import os

import pytest

from aqdetr_d2.experiments.runs import HOLDOUT, log_header, train_net_command
from train_net_helpers import load_script


@pytest.fixture(scope="module")
def pick(project_root):
    return load_script(os.path.join(project_root, "tools", "pick_on_holdout.py"), "pick_on_holdout")


def _evaluated_run(pick, folder, ap):
    """A finished run whose holdout evaluation already ran: its log holds Detectron2's copypaste lines."""
    os.makedirs(folder)
    for name in ("config.yaml", "model_final.pth"):
        (folder / name).write_text(name)
    run_dir = str(folder)
    opts = ["--eval-only", "MODEL.WEIGHTS", os.path.join(run_dir, "model_final.pth"), *HOLDOUT]
    command = train_net_command(os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "holdout"), opts)
    (folder / "holdout.log").write_text(
        log_header(command) + "d2.evaluation.testing INFO: copypaste: AP,AP50,AP75,APs,APm,APl\n"
        f"d2.evaluation.testing INFO: copypaste: {ap},90.0,60.0,10.0,20.0,30.0\n")


def test_picks_the_highest_holdout_ap_without_evaluating_again(pick, tmp_path, monkeypatch):
    for name, ap in (("lsq_seed1", 52.5), ("aq_seed1", 53.75), ("aux_seed1", 53.5)):
        _evaluated_run(pick, tmp_path / name, ap)
    monkeypatch.setattr(pick, "train_net", lambda *a: pytest.fail("evaluated a run whose log holds its metrics"))
    out = tmp_path / "pick.json"
    pick.main([str(tmp_path / n) for n in ("lsq_seed1", "aq_seed1", "aux_seed1")] + ["--output", str(out)])
    written = json.loads(out.read_text())
    assert written["pick"] == str(tmp_path / "aq_seed1")
    assert [r["holdout"]["AP"] for r in written["runs"]] == [52.5, 53.75, 53.5]


def test_an_unfinished_run_is_refused_by_name(pick, tmp_path):
    os.makedirs(tmp_path / "aq_seed3")
    (tmp_path / "aq_seed3" / "config.yaml").write_text("")
    with pytest.raises(SystemExit, match="aq_seed3 is not a finished run: model_final.pth is missing"):
        pick.main([str(tmp_path / "aq_seed3"), "--output", str(tmp_path / "pick.json")])
