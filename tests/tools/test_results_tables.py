"""Results tables: the pairing rule, mean ± std over seeds, and the generated markdown (--check)."""
import json
import os

import numpy as np
import pytest

from aqdetr_d2.utils.results import (grid_table, load_results, paired_claim, pairs_table, rerun_table,
                                   rows_table)
from train_net_helpers import load_script


def _row(key, aps, name=None):
    seeds = [{"seed": i + 1, "AP": ap, "AP50": ap + 30, "AP75": ap + 5} for i, ap in enumerate(aps)]
    mean = float(np.mean(aps))
    return {"name": name or key, "key": key, "AP": mean, "AP50": mean + 30, "AP75": mean + 5, "seeds": seeds}


def _results(precision, rows):
    return {"args": {"arch": "detr", "precision": precision}, "rows": rows}


@pytest.mark.parametrize("aps, expected", [
    ([51.0, 52.1, 50.9], "gain"),  # +1.0 / +1.1 / +0.9: same sign, mean 1.0 > 2 x 0.1
    ([49.0, 49.9, 49.1], "loss"),
    ([50.1, 53.0, 50.2], "within noise"),  # all above, but mean 1.1 < 2 x std 1.65
    ([51.0, 50.5, 51.0], "within noise"),  # one seed below
])
def test_pairing_rule(aps, expected):
    baseline = _row("lsq", [50.0, 51.0, 50.0])
    assert paired_claim(_row("aq", aps), baseline) == expected
    diffs = np.array(aps) - np.array([50.0, 51.0, 50.0])
    independent = (abs(diffs.mean()) > 2 * diffs.std(ddof=1)) and (np.all(diffs > 0) or np.all(diffs < 0))
    assert (expected != "within noise") == bool(independent)


def test_one_shared_seed_is_never_a_gain():
    assert paired_claim(_row("aq", [60.0]), _row("lsq", [50.0])) == "within noise"


def test_rows_table_shows_mean_std_each_seed_and_the_claim():
    teacher = {"name": "teacher", "key": "teacher", "AP": 57.6, "AP50": 96.5, "AP75": 69.2}
    table = rows_table(_results("w2a2", [teacher, _row("lsq", [50.0, 51.0, 50.0]),
                                         _row("aq", [51.0, 52.1, 50.9])]))
    lines = table.splitlines()
    assert lines[2].startswith("| teacher | `teacher` | 57.6 | 96.5 | 69.2 | - | - |")
    std = np.std([50.0, 51.0, 50.0], ddof=1)
    assert f"| 50.3 ± {std:.1f} |" in lines[3] and "50.0 / 51.0 / 50.0" in lines[3]
    assert lines[4].endswith("| gain |")


def test_pairs_table_compares_any_two_rows_by_the_pairing_rule():
    results = _results("w4a4", [_row("aux", [54.8, 53.7, 52.9], name="aux"), _row("aq", [53.2, 53.6, 53.4], name="aq"),
                                _row("lsq", [50.0, 51.0, 50.0], name="lsq")])
    lines = pairs_table(results, ["aq:aux", "aq:lsq", "aux:aq:AP50"]).splitlines()
    diffs = np.array([53.2, 53.6, 53.4]) - np.array([54.8, 53.7, 52.9])
    assert lines[2] == (f"| aq vs aux | AP | -1.6 / -0.1 / +0.5 | {diffs.mean():+.1f} ± {diffs.std(ddof=1):.1f} | "
                        "within noise |")
    assert lines[3].startswith("| aq vs lsq | AP | +3.2 / +2.6 / +3.4 |") and lines[3].endswith("| gain |")
    assert lines[4].startswith("| aux vs aq | AP50 | +1.6 / +0.1 / -0.5 |")  # _row: AP50 = AP + 30
    with pytest.raises(KeyError, match="no row 'distill'"):
        pairs_table(results, ["aq:distill"])


def test_rerun_table_sets_each_row_beside_the_same_seed_of_the_reference():
    teacher = {"name": "teacher", "key": "teacher", "AP": 57.6, "AP50": 96.5, "AP75": 69.2}
    reference = _results("w4a4", [teacher, _row("lsq", [50.0, 51.0, 50.0], name="lsq")])
    rerun = _results("w4a4", [dict(teacher), _row("lsq", [50.7], name="lsq")])
    lines = rerun_table(rerun, reference).splitlines()
    assert lines[2] == "| teacher | `teacher` | - | 57.60 / 57.60 | 96.50 / 96.50 | 69.20 / 69.20 | 0.00 | yes |"
    # seed 1 against the reference's seed 1 (50.0), not its mean (50.3): 0.7 apart, beyond 0.5
    assert lines[3] == "| lsq | `lsq` | 1 | 50.70 / 50.00 | 80.70 / 80.00 | 55.70 / 55.00 | 0.70 | no |"
    with pytest.raises(KeyError, match="no seed 4"):
        rerun_table(_results("w4a4", [{**_row("lsq", [50.0]), "seeds": [{"seed": 4, "AP": 1, "AP50": 1, "AP75": 1}]}]),
                    reference)


def test_grid_puts_precisions_side_by_side():
    table = grid_table([_results("w4a4", [_row("lsq", [50.0, 52.0]), _row("aq", [49.0])]),
                        _results("w2a2", [_row("lsq", [20.0, 22.0]), _row("aq+interp", [30.0, 30.0])])])
    assert table.splitlines()[0] == "| run | W4A4A4 | W2A2A2 |"
    assert "| LSQ | 51.0 ± 1.4 | 21.0 ± 1.4 |" in table
    assert "| AQ-DETR (auxiliary queries + distillation) | 49.0 | - |" in table  # one seed: no spread shown
    assert "| AQ-DETR (auxiliary queries + distillation), interpolated with its start | - | 30.0 ± 0.0 |" in table


def test_rows_without_a_key_are_refused(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_results("w4a4", [{"name": "LSQ", "AP": 1.0}])))
    with pytest.raises(ValueError, match="key"):
        load_results(str(path))


def test_tool_rewrites_and_checks_marked_tables(project_root, tmp_path, capsys):
    tool = load_script(os.path.join(project_root, "tools", "results_tables.py"), "results_tables_tool")
    (tmp_path / "docs" / "exp").mkdir(parents=True)
    (tmp_path / "docs" / "exp" / "results.json").write_text(
        json.dumps(_results("w4a4", [_row("lsq", [50.0, 51.0]), _row("aq", [50.5, 52.0])])))
    marker = "<!-- results-table: rows docs/exp/results.json -->\n"
    pairs = "<!-- results-table: pairs docs/exp/results.json aq:lsq -->\n"
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{marker}| typed by hand |\n<!-- /results-table -->\n\n"
                      f"{pairs}| typed |\n<!-- /results-table -->\n\ntext\n")
    assert tool.main(["--check"], root=str(tmp_path)) == 1
    assert "README.md" in capsys.readouterr().out
    assert tool.main([], root=str(tmp_path)) == 0
    text = readme.read_text()
    assert "typed by hand" not in text and "| lsq | `lsq` | 50.5 ± 0.7 |" in text and text.endswith("\n\ntext\n")
    assert "| aq vs lsq | AP | +0.5 / +1.0 | +0.8 ± 0.4 | gain |" in text  # both above, mean 0.75 > 2 x 0.35
    assert tool.main(["--check"], root=str(tmp_path)) == 0
