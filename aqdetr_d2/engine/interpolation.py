"""Weight-space interpolation of a quantization-aware fine-tune with the model it started from.

WiSE-FT (Wortsman et al., "Robust fine-tuning of zero-shot models", CVPR 2022) evaluates
`(1 - alpha) * start + alpha * fine_tuned`. Here the start is the float teacher loaded into the
quantized student with its quantizers calibrated, i.e. the exact state training began from (the
same `MODEL.WEIGHTS`, `MODEL.QUANT.CALIB_BATCHES` and calibration images as `train_net.py`), and
every floating-point tensor is interpolated, quantizer step sizes included, so the result is a
model of the same bit widths. Why on shapes: the calibrated 4-bit start keeps sharp localisation
(AP75) that the fine-tune trades for recall (AP50); between the two lies a model with both.
"""
from typing import Dict

from torch import Tensor

from .calibration import build_calibrated_model


def check_alpha(alpha: float) -> None:
    """Refuse an interpolation weight outside [0, 1] (tools check it before any model is built)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha is the fine-tuned weights' share and must be in [0, 1], got {alpha}")


def interpolate_state_dicts(start: Dict[str, Tensor], fine_tuned: Dict[str, Tensor], alpha: float) -> Dict[str, Tensor]:
    """`(1 - alpha) * start + alpha * fine_tuned` for every floating-point tensor (same shapes in
    both); other tensors (e.g. quantizers' `initialized` flags) are taken from `fine_tuned`."""
    check_alpha(alpha)
    if start.keys() != fine_tuned.keys():
        differ = sorted(start.keys() ^ fine_tuned.keys())
        raise ValueError(f"The two state dicts hold different tensors, e.g. {differ[:5]}: the fine-tune was "
                         "made with another config than the one its start is built from")
    out = {}
    for key, tuned in fine_tuned.items():
        begun = start[key]
        if begun.shape != tuned.shape:
            raise ValueError(f"{key}: start {tuple(begun.shape)} vs fine-tuned {tuple(tuned.shape)}")
        out[key] = begun.to(tuned).lerp(tuned, alpha) if tuned.is_floating_point() else tuned.clone()
    return out


def calibrated_start(cfg) -> Dict[str, Tensor]:
    """The state a fine-tune of `cfg` began from: `MODEL.WEIGHTS` loaded into its model and the
    quantizers calibrated as training calibrates them. Tensors that `MODEL.WEIGHTS` does not
    hold (the training-only auxiliary queries) keep their initialisation; inference never uses them."""
    return build_calibrated_model(cfg).state_dict()
