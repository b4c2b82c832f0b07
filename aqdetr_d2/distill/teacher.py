"""Build the frozen full-precision teacher from its own config and checkpoint."""
import logging
import os

from torch import nn

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from ..config import add_aqdetr_config, merge_config
from ..checkpoint import AQDETRCheckpointer
from ..errors import UserInputError
from ..modeling import meta_arch_class

logger = logging.getLogger(__name__)


class TeacherConfigError(UserInputError, ValueError):
    """MODEL.DISTILL's teacher config or weights are missing or do not match the student."""


def teacher_config(cfg):
    """The teacher's config: `MODEL.DISTILL.TEACHER_CONFIG`, float, without auxiliary queries."""
    d = cfg.MODEL.DISTILL
    if not d.TEACHER_CONFIG:
        raise TeacherConfigError("MODEL.DISTILL.ENABLED needs MODEL.DISTILL.TEACHER_CONFIG (the teacher's config file)")
    if not os.path.isfile(d.TEACHER_CONFIG):
        raise TeacherConfigError(f"MODEL.DISTILL.TEACHER_CONFIG '{d.TEACHER_CONFIG}' does not exist")
    tcfg = get_cfg()
    add_aqdetr_config(tcfg)
    merge_config(tcfg, d.TEACHER_CONFIG)
    tcfg.MODEL.DEVICE = cfg.MODEL.DEVICE
    tcfg.MODEL.WEIGHTS = d.TEACHER_WEIGHTS
    tcfg.MODEL.QUANT.ENABLED = False
    tcfg.MODEL.DISTILL.ENABLED = False
    if "AUX_QUERIES" in tcfg.MODEL:
        tcfg.MODEL.AUX_QUERIES.ENABLED = False
    check_teacher_matches(cfg, tcfg)
    return tcfg


def check_teacher_matches(student_cfg, teacher_cfg):
    """Raise if the teacher cannot be compared layer by layer with the student."""
    arch_s, arch_t = student_cfg.MODEL.META_ARCHITECTURE, teacher_cfg.MODEL.META_ARCHITECTURE
    if arch_s != arch_t:
        raise TeacherConfigError(f"Teacher meta-architecture '{arch_t}' does not match the student's '{arch_s}'; "
                         "MODEL.DISTILL.TEACHER_CONFIG must describe the same architecture in full precision")
    arch = meta_arch_class(student_cfg)
    s, t = arch.config_of(student_cfg), arch.config_of(teacher_cfg)
    diffs = [f"MODEL.{arch.config_node}.{k}: student {s[k]} vs teacher {t[k]}"
             for k in arch.teacher_matching_keys if s[k] != t[k]]
    if diffs:
        raise TeacherConfigError("Teacher and student differ, so their layers cannot be distilled one to one:\n  "
                         + "\n  ".join(diffs))


def build_teacher(cfg) -> nn.Module:
    """The frozen teacher: built from its config, loaded from `MODEL.DISTILL.TEACHER_WEIGHTS`
    (a whole-detector checkpoint: missing tensors are an error), eval mode, no gradients."""
    tcfg = teacher_config(cfg)
    if not tcfg.MODEL.WEIGHTS:
        raise TeacherConfigError("MODEL.DISTILL.ENABLED needs MODEL.DISTILL.TEACHER_WEIGHTS (the float teacher's checkpoint)")
    if not os.path.isfile(tcfg.MODEL.WEIGHTS):
        raise TeacherConfigError(f"MODEL.DISTILL.TEACHER_WEIGHTS '{tcfg.MODEL.WEIGHTS}' does not exist")
    teacher = build_model(tcfg)
    role = (f"teacher checkpoint (MODEL.DISTILL.TEACHER_WEIGHTS, built with MODEL.DISTILL.TEACHER_CONFIG "
            f"{cfg.MODEL.DISTILL.TEACHER_CONFIG})")
    AQDETRCheckpointer(teacher, require_complete=True, role=role).load(tcfg.MODEL.WEIGHTS, checkpointables=[])
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    logger.info("Teacher %s loaded from %s", tcfg.MODEL.META_ARCHITECTURE, tcfg.MODEL.WEIGHTS)
    return teacher

