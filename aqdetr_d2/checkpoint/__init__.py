from .checkpointer import AQDETRCheckpointer, CheckpointMismatchError
from .official import convert_official_state_dict

__all__ = ["AQDETRCheckpointer", "CheckpointMismatchError", "convert_official_state_dict"]
