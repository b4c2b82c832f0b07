"""AdamW / SGD with DETR's parameter groups and full-model gradient clipping."""
from typing import Dict, List

import torch
from torch import nn

from ..quant import QuantizerBase

_OPTIMIZERS = {"ADAMW": torch.optim.AdamW, "SGD": torch.optim.SGD}


def detr_param_groups(model: nn.Module, base_lr: float, weight_decay: float,
                      backbone_multiplier: float, linear_proj_multiplier: float,
                      no_decay_keywords) -> List[Dict]:
    """One group per (lr, weight decay) pair.

    Backbone parameters get `base_lr * backbone_multiplier`; Deformable-DETR's
    sampling-offset and reference-point projections get `linear_proj_multiplier` (their
    outputs are coordinates, which large steps throw off the map); parameters whose name
    contains a `no_decay_keywords` entry (e.g. norms, biases, embeddings) and quantizer step
    sizes / offsets get no decay.
    """
    groups: Dict[tuple, List[nn.Parameter]] = {}
    # Decaying a step size towards 0 would shrink the quantization range for no reason.
    quantizer_params = {id(p) for m in model.modules() if isinstance(m, QuantizerBase) for p in m.parameters()}
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        lr = base_lr
        if name.startswith("backbone."):
            lr *= backbone_multiplier
        elif "sampling_offsets" in name or "reference_points" in name:
            lr *= linear_proj_multiplier
        no_decay = id(param) in quantizer_params or any(k in name for k in no_decay_keywords)
        decay = 0.0 if no_decay else weight_decay
        groups.setdefault((lr, decay), []).append(param)
    return [{"params": p, "lr": lr, "weight_decay": wd} for (lr, wd), p in groups.items()]


def _with_full_model_clipping(optim_cls, clip_norm: float, norm_type: float):
    """Subclass of `optim_cls` whose step first clips the norm of all gradients together."""

    class FullModelGradientClipping(optim_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, clip_norm, norm_type)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = optim_cls.__name__ + "WithFullModelGradientClipping"
    return FullModelGradientClipping


def build_detr_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name not in _OPTIMIZERS:
        raise ValueError(f"SOLVER.OPTIMIZER must be one of {sorted(_OPTIMIZERS)}, got '{cfg.SOLVER.OPTIMIZER}'")
    groups = detr_param_groups(model, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY,
                               cfg.SOLVER.BACKBONE_MULTIPLIER, cfg.SOLVER.LINEAR_PROJ_MULTIPLIER,
                               cfg.SOLVER.NO_DECAY_KEYWORDS)
    optim_cls = _OPTIMIZERS[name]
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        optim_cls = _with_full_model_clipping(optim_cls, clip.CLIP_VALUE, clip.NORM_TYPE)
    if name == "SGD":
        optimizer = optim_cls(groups, cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM)
    else:
        optimizer = optim_cls(groups, cfg.SOLVER.BASE_LR)
    if clip.ENABLED and clip.CLIP_TYPE != "full_model":
        from detectron2.solver import build as solver_build

        optimizer = solver_build.maybe_add_gradient_clipping(cfg, optimizer)
    return optimizer
