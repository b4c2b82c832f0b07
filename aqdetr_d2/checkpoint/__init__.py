from .checkpointer import AQDETRCheckpointer, CheckpointMismatchError
from .official import convert_official_state_dict
from .safe_load import UnsafeCheckpointError, load_torch_weights

__all__ = ["AQDETRCheckpointer", "CheckpointMismatchError", "UnsafeCheckpointError", "convert_official_state_dict",
           "load_torch_weights"]
