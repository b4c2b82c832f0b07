"""Layer-by-layer distillation from a frozen full-precision teacher."""
from .distiller import MODES, LayerDistiller
from .teacher import build_teacher, check_teacher_matches, teacher_config

__all__ = ["MODES", "LayerDistiller", "build_distiller", "build_teacher", "check_teacher_matches",
           "teacher_config"]


def build_distiller(cfg) -> LayerDistiller:
    """`MODEL.DISTILL` -> a LayerDistiller holding the frozen teacher."""
    d = cfg.MODEL.DISTILL
    weights = {"loss_distill_enc_attn": d.ENC_ATTN_WEIGHT, "loss_distill_enc_out": d.ENC_OUT_WEIGHT,
               "loss_distill_dec_hidden": d.DEC_HIDDEN_WEIGHT, "loss_distill_dec_cls": d.DEC_CLASS_WEIGHT,
               "loss_distill_dec_box": d.DEC_BOX_WEIGHT}
    return LayerDistiller(build_teacher(cfg), cfg.MODEL.META_ARCHITECTURE, weights, d.MODE, d.FOREGROUND_ONLY)
