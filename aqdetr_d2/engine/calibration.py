"""Initialise a quantized model's step sizes from training images before it is used."""
import itertools
import logging
from typing import Optional

from torch import nn

from detectron2.data import build_detection_test_loader
from detectron2.modeling import build_model
from detectron2.utils import comm

from ..checkpoint import AQDETRCheckpointer
from ..data import DetrDatasetMapper
from ..quant import calibrate, iter_quantizers

logger = logging.getLogger(__name__)


def uninitialized_quantizers(model: nn.Module):
    return [q for q in iter_quantizers(model) if q.enabled and not bool(q.initialized)]


def initialize_quantizers(cfg, model: nn.Module) -> int:
    """Calibrate every quantizer that a checkpoint did not set, from `MODEL.QUANT.CALIB_BATCHES`
    batches of the first training dataset (test-time resizing, no augmentation).

    A float checkpoint loaded into a quantized model leaves them unset; a quantized checkpoint
    sets them all, and then nothing runs, so resuming and `--eval-only` reproduce the saved
    model exactly. Statistics are reduced across DDP ranks, so every rank gets the same step
    sizes. Returns the number of batches used.
    """
    model = getattr(model, "module", model)
    pending = uninitialized_quantizers(model)
    # Every rank must agree to run calibration: its reductions are collective.
    if not any(comm.all_gather(bool(pending))):
        return 0
    if not cfg.DATASETS.TRAIN:
        raise ValueError("Quantizers need calibration data but DATASETS.TRAIN is empty")
    batch_size = max(cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(), 1)
    loader = build_detection_test_loader(cfg, cfg.DATASETS.TRAIN[0], batch_size=batch_size,
                                         mapper=DetrDatasetMapper(cfg, is_train=False))
    used = calibrate(model, itertools.islice(iter(loader), cfg.MODEL.QUANT.CALIB_BATCHES))
    logger.info("Initialised %d quantizers from %d batch(es) of %s", len(pending), used, cfg.DATASETS.TRAIN[0])
    left = uninitialized_quantizers(model)
    if left:
        raise RuntimeError(f"{len(left)} quantizers saw no data during calibration; check MODEL.QUANT.PARTS")
    return used


def build_calibrated_model(cfg, weights: Optional[str] = None) -> nn.Module:
    """The model of `cfg` ready for inference, as `--eval-only` builds it: `weights` (default
    MODEL.WEIGHTS; the model only, its averaged weights with MODEL_EMA.ENABLED) loaded, the
    quantizers a float checkpoint leaves unset calibrated, eval mode. Without weights it warns
    and keeps the random initialisation."""
    model = build_model(cfg)
    path = cfg.MODEL.WEIGHTS if weights is None else weights
    if path:
        AQDETRCheckpointer(model, use_ema=cfg.MODEL_EMA.ENABLED).load(path, checkpointables=[])
    else:
        logger.warning("MODEL.WEIGHTS is empty: the model keeps its random initialisation")
    initialize_quantizers(cfg, model)
    return model.eval()
