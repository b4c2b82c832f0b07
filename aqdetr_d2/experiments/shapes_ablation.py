"""The shapes ablation's definitions: architectures, precisions, variants and the options every
fine-tune from the teacher shares (tools/quickstart.py, tools/sweep.py)."""

# Teacher schedules: iterations, the learning-rate drops (x0.1 each), and how many evaluations
# (on shapes_holdout) draw its curve. DETR's dense attention still gained 4.5 AP at the drop of a
# 9000-iteration run, and at 2e-5 its holdout AP still swung by 1.5 AP between evaluations
# (10000-11500): a second drop at 12000, 1500 iterations before the last quarter begins, lets
# that quarter (13500-18000, all at 2e-6) show whether AP has stopped rising.
ARCHS = {
    "deformable": {"teacher": "configs/shapes/deformable_detr_fp32.yaml", "student": "configs/shapes/aq_deformable_detr_{p}.yaml",
                   "teacher_iters": 3500, "teacher_lr_drops": (3000,), "teacher_evals": 5},
    "detr": {"teacher": "configs/shapes/detr_fp32.yaml", "student": "configs/shapes/aqdetr_{p}.yaml",
             "teacher_iters": 18000, "teacher_lr_drops": (6000, 12000), "teacher_evals": 36},
}
# The teacher's training curve is drawn on held-out images, never on shapes_val.
TEACHER_CURVE_OPTS = ["DATASETS.TEST", "('shapes_holdout',)"]
# --precision -> the bits it names: weights, activations, attention.
PRECISIONS = {"w4a4": "W4A4A4", "w3a3": "W3A3A3", "w2a2": "W2A2A2", "w4a4a8": "W4A4A8"}
# A half-width ResNet-18 keeps the teacher's checkpoint small enough to commit (~17 MB);
# teacher and students share it.
BACKBONE_OPTS = ["MODEL.BACKBONE.NAME", "build_narrow_resnet_backbone", "MODEL.RESNETS.STEM_OUT_CHANNELS", "32",
                 "MODEL.RESNETS.RES2_OUT_CHANNELS", "32"]
# Ablation rows: --variants key -> (row name, quantized, auxiliary queries, distillation). "fp"
# fine-tunes the teacher unquantized on the students' schedule: the AP that fine-tuning alone
# moves, against which the quantized rows' distance to the teacher is read.
VARIANTS = {"fp": ("full precision, fine-tuned", False, False, False), "lsq": ("LSQ", True, False, False),
            "aux": ("LSQ + aux queries", True, True, False), "distill": ("LSQ + distillation", True, False, True),
            "aq": ("AQ-DETR (aux queries + distillation)", True, True, True)}
# The main job (scripts/quickstart.sh with no argument): the control, LSQ and AQ-DETR.
DEFAULT_VARIANTS = ["fp", "lsq", "aq"]


def teacher_schedule(arch, iters=None):
    """train_net options for the teacher: `iters` (default the arch's) with the LR drops at the same fractions."""
    default = arch["teacher_iters"]
    iters = iters or default
    drops = ", ".join(str(int(d * iters / default)) for d in arch["teacher_lr_drops"])
    period = str(max(iters // arch["teacher_evals"], 1))
    return ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({drops},)", "TEST.EVAL_PERIOD", period,
            "SOLVER.CHECKPOINT_PERIOD", period]


# A fine-tune checkpoints this often, so that an interrupted one resumes (exactly) instead of
# starting over; a 1000-iteration AQ-DETR fine-tune takes about 35 minutes on one core.
FINE_TUNE_CHECKPOINT_PERIOD = 200


def fine_tune_opts(teacher: str, teacher_cfg: str, iters: int):
    """train_net options of every fine-tune from the teacher: its weights (and, for distillation,
    the teacher itself), `iters` iterations with the learning-rate drop at 80 %, one evaluation
    at the end, a checkpoint every `FINE_TUNE_CHECKPOINT_PERIOD` iterations."""
    return BACKBONE_OPTS + ["MODEL.WEIGHTS", teacher, "MODEL.DISTILL.TEACHER_WEIGHTS", teacher,
                            "MODEL.DISTILL.TEACHER_CONFIG", teacher_cfg, "SOLVER.MAX_ITER", str(iters),
                            "SOLVER.STEPS", f"({int(iters * 0.8)},)", "TEST.EVAL_PERIOD", "0",
                            *checkpoint_opts(iters)]


def checkpoint_opts(iters: int):
    """The checkpoint period of an `iters`-iteration fine-tune, as train_net options."""
    return ["SOLVER.CHECKPOINT_PERIOD", str(min(iters, FINE_TUNE_CHECKPOINT_PERIOD))]


def slowest_first(key: str):
    """Sort key putting variant `key`'s runs first the longer they take (distillation runs the
    teacher, auxiliary queries triple the decoder's queries), so that parallel jobs end together."""
    _, _, aux, distill = VARIANTS[key]
    return not distill, not aux


def variant_opts(key: str):
    """The switches of variant `key`: quantization, auxiliary queries, distillation."""
    _, quantized, aux, distill = VARIANTS[key]
    return ["MODEL.QUANT.ENABLED", str(quantized), "MODEL.AUX_QUERIES.ENABLED", str(aux),
            "MODEL.DISTILL.ENABLED", str(distill)]
