"""Config keys of AQ-DETR, added on top of Detectron2's defaults."""
import difflib
import re

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .data.config import add_detr_input_config
from .data.custom import register_config_datasets
from .errors import UserInputError


def _add_common_detr_keys(node: CN, num_queries: int, hidden_dim: int, dim_feedforward: int):
    node.NUM_CLASSES = 80  # foreground classes (no background / no-object entry)
    node.NUM_OBJECT_QUERIES = num_queries  # object queries kept at inference
    node.HIDDEN_DIM = hidden_dim  # transformer width
    node.NHEADS = 8  # attention heads
    node.DIM_FEEDFORWARD = dim_feedforward  # FFN width
    node.ENC_LAYERS = 6  # encoder layers
    node.DEC_LAYERS = 6  # decoder layers
    node.DROPOUT = 0.1  # dropout inside the transformer
    node.DEEP_SUPERVISION = True  # losses on every decoder layer, not just the last
    node.CLASS_WEIGHT = 1.0  # classification loss weight
    node.L1_WEIGHT = 5.0  # L1 box loss weight
    node.GIOU_WEIGHT = 2.0  # GIoU box loss weight
    node.COST_CLASS = 1.0  # Hungarian matching: class cost weight
    node.COST_BBOX = 5.0  # Hungarian matching: L1 cost weight
    node.COST_GIOU = 2.0  # Hungarian matching: GIoU cost weight


def add_aqdetr_config(cfg: CN) -> None:
    """Add the keys of `AQDETR` and `AQDeformableDETR` to a Detectron2 config, in place."""
    cfg.MODEL.DETR = CN()
    _add_common_detr_keys(cfg.MODEL.DETR, num_queries=100, hidden_dim=256, dim_feedforward=2048)
    cfg.MODEL.DETR.IN_FEATURE = "res5"  # backbone feature the transformer reads
    cfg.MODEL.DETR.PRE_NORM = False  # pre-norm transformer layers (DETR default: post-norm)
    cfg.MODEL.DETR.NO_OBJECT_WEIGHT = 0.1  # relative CE weight of the no-object class
    # Convergence aids for CPU-sized proxies (the papers' DETR uses none of them):
    cfg.MODEL.DETR.FOCAL_LOSS = False  # per-class sigmoid focal classification, no no-object class
    cfg.MODEL.DETR.FOCAL_ALPHA = 0.25  # sigmoid focal loss alpha (with FOCAL_LOSS)
    cfg.MODEL.DETR.BOX_REFINE = False  # anchor boxes as query positions, refined by a head per decoder layer
    cfg.MODEL.DETR.TWO_STAGE = False  # anchors from the best encoder proposals (needs BOX_REFINE, FOCAL_LOSS)
    cfg.MODEL.DETR.SPATIAL_PRIOR = False  # Gaussian around each anchor box on cross-attention logits (SMCA; BOX_REFINE)
    cfg.MODEL.DETR.TOPK_TEST = 100  # with FOCAL_LOSS: (query, class) detections kept per image

    cfg.MODEL.DEFORMABLE_DETR = CN()
    _add_common_detr_keys(cfg.MODEL.DEFORMABLE_DETR, num_queries=300, hidden_dim=256,
                          dim_feedforward=1024)
    cfg.MODEL.DEFORMABLE_DETR.IN_FEATURES = ["res3", "res4", "res5"]  # backbone levels used
    cfg.MODEL.DEFORMABLE_DETR.NUM_FEATURE_LEVELS = 4  # levels incl. extra stride-2 convs on the last
    cfg.MODEL.DEFORMABLE_DETR.ENC_N_POINTS = 4  # sampling points per head and level, encoder
    cfg.MODEL.DEFORMABLE_DETR.DEC_N_POINTS = 4  # sampling points per head and level, decoder
    cfg.MODEL.DEFORMABLE_DETR.WITH_BOX_REFINE = False  # iterative bounding-box refinement
    cfg.MODEL.DEFORMABLE_DETR.TWO_STAGE = False  # two-stage: queries selected from encoder output
    cfg.MODEL.DEFORMABLE_DETR.FOCAL_ALPHA = 0.25  # sigmoid focal loss alpha
    cfg.MODEL.DEFORMABLE_DETR.CLASS_WEIGHT = 2.0  # focal classification loss weight (Deformable-DETR: 2)
    cfg.MODEL.DEFORMABLE_DETR.COST_CLASS = 2.0  # Hungarian matching: focal class cost weight
    cfg.MODEL.DEFORMABLE_DETR.TOPK_TEST = 100  # detections kept per image at inference

    cfg.MODEL.QUANT = CN()
    cfg.MODEL.QUANT.ENABLED = False  # fake-quantize the model (quantization-aware training)
    cfg.MODEL.QUANT.WEIGHT_BITS = 4  # layer weights, per output channel: 2, 3, 4, 8 or 32 (off)
    cfg.MODEL.QUANT.ACT_BITS = 4  # layer inputs, per tensor: 2, 3, 4, 8 or 32 (off)
    cfg.MODEL.QUANT.ATTN_BITS = 4  # attention q, k, v, softmax output / deformable values and weights
    cfg.MODEL.QUANT.QUANTIZER = "lsq"  # "lsq", "lsq+" (learnable offset) or "minmax" (PTQ baseline)
    cfg.MODEL.QUANT.LEARNABLE_OFFSET = False  # LSQ+ offset on activations with QUANTIZER "lsq"
    cfg.MODEL.QUANT.ATTN_PER_HEAD = True  # one attention step size per head, else per tensor
    cfg.MODEL.QUANT.ATTN_PROB_INIT = "lsq"  # softmax-output step sizes: "lsq" (2 mean / sqrt(Qp)) or "mse" (least error)
    cfg.MODEL.QUANT.PARTS = ["BACKBONE", "ENCODER", "DECODER", "HEADS"]  # parts that get quantized
    cfg.MODEL.QUANT.KEEP_FP_DEFAULTS = True  # keep stem conv, input proj, class head, last box layer float
    cfg.MODEL.QUANT.KEEP_FP_PATTERNS = []  # more module-name globs kept float
    cfg.MODEL.QUANT.INT8_PATTERNS = []  # module-name globs quantized at >= 8 bit (e.g. the stem conv)
    cfg.MODEL.QUANT.CALIB_BATCHES = 1  # batches that initialise step sizes before training / PTQ eval
    cfg.MODEL.QUANT.LEARN_FROZEN_STEP_SIZES = True  # also train step sizes of frozen layers (FREEZE_AT); backward runs through them
    cfg.MODEL.QUANT.INTEGER_BIAS = False  # convs fold frozen batch norms and round biases to int32 steps, as exported (train and eval)
    cfg.MODEL.QUANT.INTEGER_EVAL = False  # --eval-only computes as the ONNX export does (batch norm folded, int32 conv bias)

    # Auxiliary queries (H-DETR hybrid matching / Group-DETR): training-only decoder queries that
    # give the (quantized) decoder more positive samples; dropped at inference.
    cfg.MODEL.AUX_QUERIES = CN()
    cfg.MODEL.AUX_QUERIES.ENABLED = False  # add the auxiliary queries and their loss in training
    cfg.MODEL.AUX_QUERIES.NUM_QUERIES = 1500  # number of auxiliary queries (e.g. 1500 beside 300 on COCO)
    cfg.MODEL.AUX_QUERIES.MODE = "hybrid"  # "hybrid": one-to-many on repeated targets; "group": K one-to-one groups
    cfg.MODEL.AUX_QUERIES.K = 6  # hybrid: times the ground truth is repeated; group: number of groups
    cfg.MODEL.AUX_QUERIES.LOSS_WEIGHT = 1.0  # lambda_aux, multiplies every auxiliary-query loss

    cfg.MODEL.DISTILL = CN()
    cfg.MODEL.DISTILL.ENABLED = False  # layer-by-layer distillation from a frozen float teacher
    cfg.MODEL.DISTILL.TEACHER_CONFIG = ""  # teacher's config file (same architecture, full precision)
    cfg.MODEL.DISTILL.TEACHER_WEIGHTS = ""  # teacher's checkpoint (a whole detector)
    cfg.MODEL.DISTILL.MODE = "teacher_forced"  # "teacher_forced": teacher layers get student inputs; "parallel"
    cfg.MODEL.DISTILL.ENC_ATTN_WEIGHT = 1.0  # KL of encoder attention maps / deformable weights, per layer
    cfg.MODEL.DISTILL.ENC_OUT_WEIGHT = 1.0  # MSE of encoder layer outputs
    cfg.MODEL.DISTILL.DEC_HIDDEN_WEIGHT = 1.0  # MSE of object-query states after each decoder layer
    cfg.MODEL.DISTILL.DEC_CLASS_WEIGHT = 1.0  # KL of per-layer class scores
    cfg.MODEL.DISTILL.DEC_BOX_WEIGHT = 1.0  # L1 of per-layer boxes
    cfg.MODEL.DISTILL.FOREGROUND_ONLY = False  # decoder terms on matched queries only (Q-DETR baseline)

    cfg.SOLVER.OPTIMIZER = "ADAMW"  # "ADAMW" or "SGD"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1  # backbone learning rate = BASE_LR x this
    cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 0.1  # sampling-offset / reference-point layers lr factor
    # Parameters whose name contains one of these get no weight decay (quantizer steps never do).
    cfg.SOLVER.NO_DECAY_KEYWORDS = ["norm", "bias", "query_embed", "level_embed", "anchor_embed"]
    # Detectron2's CLIP_GRADIENTS keys, with DETR's defaults and one more CLIP_TYPE.
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True  # clip gradients before every optimizer step
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"  # one norm over all parameters ("value"/"norm": per parameter)
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.1  # maximum gradient norm
    cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0  # p of the p-norm

    # Average of the weights over training (d2go's key names); evaluation and inference use it.
    cfg.MODEL_EMA = CN()
    cfg.MODEL_EMA.ENABLED = False  # keep an exponential moving average of the weights and evaluate it
    cfg.MODEL_EMA.DECAY = 0.999  # per-iteration weight of the old average (averages ~1/(1-DECAY) iterations)

    add_detr_input_config(cfg)
    cfg.DATASETS.CHECK_ANNOTATIONS = True  # validate boxes / class ids before training starts
    cfg.DATASETS.CHECK_IMAGES = 5000  # decode every training image at start if the dataset has at most this many
    # Your own COCO-format data: [[name, json_file, image_root], ...], registered with Detectron2's
    # register_coco_instances when the config is read; then name them in DATASETS.TRAIN / TEST.
    cfg.DATASETS.COCO_INSTANCES = []
    # Fine-tune a checkpoint to another NUM_CLASSES: class-head tensors whose shape differs keep their
    # initialisation (logged); every other mismatch is still refused.
    cfg.MODEL.REINIT_CLASS_HEADS = False


def _close_keys(cfg: CN, key: str):
    def flatten(node, prefix=""):
        for k, v in node.items():
            name = prefix + k
            yield from flatten(v, name + ".") if isinstance(v, CN) else [name]

    return difflib.get_close_matches(key, list(flatten(cfg)), n=3)


class ConfigKeyError(UserInputError, KeyError):
    """A config key that does not exist (the message suggests the closest ones)."""


def load_config(config_file: str = None, opts=(), freeze: bool = True) -> CN:
    """Detectron2's defaults + AQ-DETR's keys + `config_file` + `KEY VALUE` overrides, for tools.

    `MODEL.DEVICE` cuda falls back to cpu where CUDA is unavailable.
    """
    import torch

    cfg = get_cfg()
    add_aqdetr_config(cfg)
    merge_config(cfg, config_file, opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    if freeze:
        cfg.freeze()
    return cfg


def merge_config(cfg: CN, config_file: str = None, opts=()) -> CN:
    """Merge a YAML file and `KEY VALUE` overrides into `cfg`, rejecting unknown keys with
    the closest valid names (yacs alone says only "Non-existent key")."""
    try:
        if config_file:
            cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError) as e:
        match = re.search(r"(?:Non-existent (?:config )?key:?\s*)([\w.]+)", str(e))
        if match is None:
            raise
        key = match.group(1)
        hint = _close_keys(cfg, key)
        raise ConfigKeyError(f"Unknown config key '{key}'"
                       + (f"; did you mean {' or '.join(hint)}?" if hint else "")
                       + " Valid keys are defined in detectron2/config/defaults.py and aqdetr_d2/config.py.") from e
    register_config_datasets(cfg)
    return cfg
