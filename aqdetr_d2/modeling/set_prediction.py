"""What `AQDETR` and `AQDeformableDETR` share: input normalization, targets, output formatting,
the per-architecture facts every model states, and the lookup of a model class from a config."""
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from detectron2.modeling import META_ARCH_REGISTRY, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances

from ..layers.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from .aux_queries import AuxQueries, aux_query_loss
from .quantization import QuantLayout

__all__ = ["SetPredictionDetector", "meta_arch_class"]

# Config sizes that must agree for a teacher and a student to be distilled layer by layer.
TEACHER_MATCHING_KEYS = ("NUM_CLASSES", "NUM_OBJECT_QUERIES", "HIDDEN_DIM", "NHEADS", "ENC_LAYERS", "DEC_LAYERS")


class SetPredictionDetector(nn.Module):
    """Input normalization, target conversion and output formatting shared by both models.

    Each model states its architecture's facts as class attributes:
    `config_node` (its node under MODEL, e.g. "DETR"), `quant_layout` (where its parts live,
    which layers stay float) and `teacher_matching_keys` (keys of that node a distillation
    teacher must share).
    """

    config_node: str
    quant_layout: QuantLayout
    teacher_matching_keys: tuple = TEACHER_MATCHING_KEYS

    @classmethod
    def config_of(cls, cfg):
        """This architecture's config node of `cfg` (cfg.MODEL.DETR, ...)."""
        return cfg.MODEL[cls.config_node]

    @classmethod
    def part_patterns(cls) -> Dict[str, list]:
        """Parts (backbone / encoder / decoder / heads) as module-name globs, for `model_report`."""
        return {name.lower(): list(patterns) for name, patterns in cls.quant_layout.parts.items()}

    def __init__(self, *, backbone, in_features, criterion, num_classes, pixel_mean, pixel_std,
                 aux_queries: Optional[AuxQueries] = None):
        super().__init__()
        self.backbone = backbone
        self.in_features = list(in_features)
        self.criterion = criterion
        self.num_classes = num_classes
        # Training-only auxiliary queries (settings; the subclass owns `aux_query_embed`).
        self.aux_queries = aux_queries
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), persistent=False)
        # Set by the trainer when distillation is on: a module without state that holds the
        # frozen teacher out of sight of state_dict(), parameters() and DDP.
        self.distiller = None

    @property
    def device(self):
        return self.pixel_mean.device

    @property
    def uses_aux_queries(self) -> bool:
        """Auxiliary queries run in training only: at inference they do not exist."""
        return self.training and self.aux_queries is not None

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(images)

    def prepare_targets(self, batched_inputs: List[Dict], images: ImageList) -> List[Dict[str, Tensor]]:
        """Instances in absolute xyxy -> labels (T,) and normalized cxcywh boxes (T, 4)."""
        targets = []
        for x, (h, w) in zip(batched_inputs, images.image_sizes):
            inst = x["instances"].to(self.device)
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_xyxy_to_cxcywh(inst.gt_boxes.tensor / scale)
            targets.append({"labels": inst.gt_classes, "boxes": boxes})
        return targets

    def forward(self, batched_inputs: List[Dict]):
        """
        Args:
            batched_inputs: Detectron2 format, per image "image" (C, H, W) uint8 in
                `INPUT.FORMAT`, "height", "width" and in training "instances".
        Returns:
            training: dict of weighted losses. Inference: per image {"instances": Instances}
            with pred_boxes (absolute xyxy in the original image), scores and pred_classes.
        """
        images = self.preprocess_image(batched_inputs)
        outputs = self.predict(images)
        if self.training:
            if any("instances" not in x for x in batched_inputs):
                raise ValueError("Training inputs need 'instances'; check the dataset mapper")
            targets = self.prepare_targets(batched_inputs, images)
            losses = self.criterion(outputs, targets)
            if "aux_query_outputs" in outputs:
                losses.update(aux_query_loss(self.criterion, outputs["aux_query_outputs"], targets,
                                             self.aux_queries))
            if self.distiller is not None:
                losses.update(self.distiller(self, images, outputs, targets))
            return losses
        results = self.inference(outputs["pred_logits"], outputs["pred_boxes"], images.image_sizes)
        return [
            {"instances": detector_postprocess(r, x.get("height", size[0]), x.get("width", size[1]))}
            for r, x, size in zip(results, batched_inputs, images.image_sizes)
        ]

    def _topk_sigmoid_instances(self, logits: Tensor, boxes: Tensor, image_sizes, topk: int) -> List[Instances]:
        """Top-k (query, class) pairs by sigmoid score: logits (B, Q, K), boxes (B, Q, 4)."""
        batch, num_queries, num_classes = logits.shape
        k = min(topk, num_queries * num_classes)
        scores, idx = logits.sigmoid().flatten(1).topk(k, dim=1)
        labels = idx % num_classes
        boxes = torch.gather(boxes, 1, (idx // num_classes).unsqueeze(-1).expand(-1, -1, 4))
        return [self._instances(s, l, b, size) for s, l, b, size in zip(scores, labels, boxes, image_sizes)]

    def _instances(self, scores, labels, boxes, image_size) -> Instances:
        h, w = image_size
        result = Instances(image_size)
        result.pred_boxes = Boxes(box_cxcywh_to_xyxy(boxes) * boxes.new_tensor([w, h, w, h]))
        result.scores = scores
        result.pred_classes = labels
        return result


def pixel_stats(cfg):
    if len(cfg.MODEL.PIXEL_MEAN) != len(cfg.MODEL.PIXEL_STD):
        raise ValueError("MODEL.PIXEL_MEAN and MODEL.PIXEL_STD must have the same length")
    return {"pixel_mean": cfg.MODEL.PIXEL_MEAN, "pixel_std": cfg.MODEL.PIXEL_STD}


def check_heads(node, name):
    if node.HIDDEN_DIM % node.NHEADS != 0:
        raise ValueError(f"{name}.HIDDEN_DIM ({node.HIDDEN_DIM}) must be divisible by "
                         f"{name}.NHEADS ({node.NHEADS})")
    if node.NUM_CLASSES < 1:
        raise ValueError(f"{name}.NUM_CLASSES must be >= 1, got {node.NUM_CLASSES}")


def meta_arch_class(cfg):
    """The class of this project that `cfg.MODEL.META_ARCHITECTURE` names (AQDETR or
    AQDeformableDETR); a clear error for any other name."""
    name = cfg.MODEL.META_ARCHITECTURE
    cls = META_ARCH_REGISTRY.get(name) if name in META_ARCH_REGISTRY else None
    if cls is None or not issubclass(cls, SetPredictionDetector):
        raise ValueError(f"MODEL.META_ARCHITECTURE {name!r} is not a model of this project; use one of "
                         f"{sorted(n for n, c in META_ARCH_REGISTRY if issubclass(c, SetPredictionDetector))}")
    return cls
