"""MODEL.QUANT.LEARN_FROZEN_STEP_SIZES: step sizes of frozen backbone stages train, or stay as calibrated."""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances


def _batch():
    gen = torch.Generator().manual_seed(0)
    inst = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[4.0, 4, 30, 30], [20, 10, 60, 50]])),
                     gt_classes=torch.tensor([1, 3]))
    return [{"image": torch.randint(0, 256, (3, 64, 64), generator=gen, dtype=torch.uint8),
             "height": 64, "width": 64, "instances": inst}]


@pytest.mark.parametrize("learn", [True, False])
def test_frozen_stage_step_sizes(make_cfg, learn):
    cfg = make_cfg("shapes/detr_fp32.yaml", "MODEL.BACKBONE.FREEZE_AT", "2", "MODEL.QUANT.ENABLED", "True",
                   "MODEL.QUANT.LEARN_FROZEN_STEP_SIZES", str(learn), "MODEL.DETR.HIDDEN_DIM", "32",
                   "MODEL.DETR.NHEADS", "4", "MODEL.DETR.DIM_FEEDFORWARD", "64", "MODEL.DETR.ENC_LAYERS", "1",
                   "MODEL.DETR.DEC_LAYERS", "1")
    model = build_model(cfg).train()
    frozen, trained = model.backbone.res2[0].conv1, model.backbone.res3[0].conv1
    assert not frozen.weight.requires_grad and trained.weight.requires_grad  # FREEZE_AT 2: stem and res2
    res2_out = []
    model.backbone.res2.register_forward_hook(lambda m, i, out: res2_out.append(out))
    sum(model(_batch()).values()).backward()

    frozen_steps = [frozen.weight_quantizer.scale, frozen.input_quantizer.scale]
    assert all(p.requires_grad == learn for p in frozen_steps)
    assert all((p.grad is not None) == learn for p in frozen_steps)
    # Without learning them the backward stops above res2, as in the float model.
    assert res2_out[0].requires_grad == learn
    assert trained.weight_quantizer.scale.grad is not None and trained.input_quantizer.scale.grad is not None
