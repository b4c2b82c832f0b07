"""Every shipped config merges; one per architecture, dataset and bit width builds its model."""
import glob
import os

import pytest

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from aqdetr_d2 import add_aqdetr_config
from aqdetr_d2.config import merge_config
from aqdetr_d2.quant import QuantLinear

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"),
                                                             recursive=True))


def _load(path, *opts):
    cfg = get_cfg()
    add_aqdetr_config(cfg)
    return merge_config(cfg, os.path.join(ROOT, path), ["MODEL.DEVICE", "cpu", *opts])


@pytest.mark.parametrize("path", CONFIGS)
def test_config_merges(path):
    cfg = _load(path)
    if cfg.MODEL.DISTILL.ENABLED:
        teacher = os.path.join(ROOT, cfg.MODEL.DISTILL.TEACHER_CONFIG)
        assert os.path.isfile(teacher), teacher
        assert _load(os.path.relpath(teacher, ROOT)).MODEL.META_ARCHITECTURE == cfg.MODEL.META_ARCHITECTURE


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.endswith(("lsq_w4a4.yaml", "lsq_w2a2.yaml"))
                                  and "voc" not in p])
def test_quantized_config_builds(path):
    cfg = _load(path, "MODEL.WEIGHTS", "")
    model = build_model(cfg)
    bits = {m.weight_quantizer.bits for m in model.modules() if isinstance(m, QuantLinear)}
    assert bits <= {cfg.MODEL.QUANT.WEIGHT_BITS, 8}
    assert cfg.MODEL.QUANT.WEIGHT_BITS in bits
    # MODEL.QUANT.ATTN_PROB_INIT reaches the softmax-output quantizers and only them.
    softmax = ("attn_quant", "attn_weight_quant")
    inits = {(n.endswith(softmax), q.init) for n, q in model.named_modules() if n.endswith("_quant")}
    assert inits == {(True, cfg.MODEL.QUANT.ATTN_PROB_INIT), (False, "lsq")}
