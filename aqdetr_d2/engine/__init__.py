from .calibration import build_calibrated_model, initialize_quantizers
from .interpolation import calibrated_start, interpolate_state_dicts
from ..checkpoint import AQDETRCheckpointer, CheckpointMismatchError
from .optimizer import build_detr_optimizer, detr_param_groups
from .trainer import AQDETRTrainer

__all__ = ["AQDETRCheckpointer", "AQDETRTrainer", "CheckpointMismatchError", "build_calibrated_model",
           "build_detr_optimizer", "calibrated_start", "detr_param_groups", "initialize_quantizers",
           "interpolate_state_dicts"]
