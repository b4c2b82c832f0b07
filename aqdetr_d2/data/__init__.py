"""Data for AQ-DETR: the synthetic shapes datasets, the DETR dataset mapper and checks."""
from .config import add_detr_input_config
from .dataset_mapper import DetrDatasetMapper, build_detr_augmentations
from .shapes import (
    SHAPES_CLASSES,
    SHAPES_SPLITS,
    default_shapes_root,
    prepare_shapes_split,
    register_shapes,
    write_shapes_split,
)
from .validation import (DatasetError, check_dataset_dicts, check_evaluator_type, check_images_readable,
                         check_num_classes, load_dataset)

__all__ = [
    "add_detr_input_config",
    "DetrDatasetMapper",
    "build_detr_augmentations",
    "SHAPES_CLASSES",
    "SHAPES_SPLITS",
    "default_shapes_root",
    "prepare_shapes_split",
    "register_shapes",
    "write_shapes_split",
    "DatasetError",
    "check_dataset_dicts",
    "check_evaluator_type",
    "check_images_readable",
    "check_num_classes",
    "load_dataset",
]

# Registers "shapes_train", "shapes_val" and "shapes_holdout"; nothing is generated until they are loaded.
register_shapes()
