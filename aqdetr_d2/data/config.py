"""Input config keys used by the DETR data pipeline."""
from detectron2.config import CfgNode

__all__ = ["add_detr_input_config"]


def add_detr_input_config(cfg: CfgNode) -> None:
    """Add the DETR input keys to ``cfg`` (in place), with the values of the DETR paper."""
    # Shortest-edge sizes (one is picked at random) applied before the random crop when
    # INPUT.CROP.ENABLED; the final INPUT.MIN_SIZE_TRAIN resize follows the crop.
    cfg.INPUT.DETR_CROP_PRE_RESIZE = (400, 500, 600)
