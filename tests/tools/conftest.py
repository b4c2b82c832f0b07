"""Fixtures of the tools/quickstart.py tests."""
import os

import pytest

from train_net_helpers import load_script


@pytest.fixture(scope="module")
def quickstart(project_root):
    return load_script(os.path.join(project_root, "tools", "quickstart.py"), "quickstart")


@pytest.fixture
def quickstart_isolated(quickstart, tmp_path, monkeypatch):
    """No committed picked configs (a test names its own), and OMP_NUM_THREADS, which the tool
    sets for its runs, restored afterwards."""
    monkeypatch.setattr(quickstart, "PICKED_CONFIGS", str(tmp_path / "no_picked_configs"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("OMP_NUM_THREADS")
