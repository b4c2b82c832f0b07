import os

import pytest
import torch

from detectron2.config import get_cfg

from aqdetr_d2 import add_aqdetr_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _single_thread_seeded():
    # Two torch processes on two cores slow each other down badly; keep tests to one thread.
    torch.set_num_threads(1)
    torch.manual_seed(0)


def _make_cfg(config_file: str, *opts):
    cfg = get_cfg()
    add_aqdetr_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", config_file))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


@pytest.fixture
def make_cfg():
    """`make_cfg("shapes/detr_fp32.yaml", KEY, VALUE, ...)`: a project config on the CPU."""
    return _make_cfg


@pytest.fixture(scope="session")
def project_root():
    return ROOT


@pytest.fixture(scope="module")
def train_net(project_root):
    """projects/AQDETR/train_net.py imported as a module (see train_net_helpers)."""
    from train_net_helpers import load_train_net

    return load_train_net(project_root)
