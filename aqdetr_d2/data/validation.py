"""
Checks of training dataset dicts. They turn problems that DETR reports late or not at all
(NaN losses, index errors inside the criterion) into one clear error before training.
"""
import json
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

from ..errors import UserInputError

__all__ = ["DatasetError", "load_dataset", "check_dataset_dicts", "check_evaluator_type", "check_images_readable", "check_num_classes"]



class DatasetError(UserInputError, ValueError):
    """A problem of the user's data, found before training: the message names the dataset, the
    image and the fix."""


_SUPPORTED_BOX_MODES = (int(BoxMode.XYXY_ABS), int(BoxMode.XYWH_ABS))
# Boxes may stick out of the image by this many pixels (rounding in converted datasets).
_OUTSIDE_TOLERANCE = 1.0
_MISSING = -1


class _Annotations:
    """All non-crowd annotations of a dataset as flat arrays, gathered in one pass."""

    def __init__(self, dataset_dicts: List[Dict]):
        counts, heights, widths, bboxes, modes, categories = [], [], [], [], [], []
        for record in dataset_dicts:
            # The mapper drops crowd annotations, so whatever they contain cannot hurt training.
            annotations = [a for a in record.get("annotations", ()) if not a.get("iscrowd", 0)]
            counts.append(len(annotations))
            heights.append(record.get("height", np.nan))
            widths.append(record.get("width", np.nan))
            bboxes.extend(a["bbox"] for a in annotations)
            modes.extend(a.get("bbox_mode", _MISSING) for a in annotations)
            categories.extend(a["category_id"] for a in annotations)
        self.records = dataset_dicts
        self.image_index = np.repeat(np.arange(len(dataset_dicts)), counts)
        self.bboxes = bboxes  # as given, for the messages
        self.modes = np.array([int(m) for m in modes], dtype=np.int64)
        self.categories = np.array(categories, dtype=np.int64)
        # (N, 2): height and width of the image of each annotation.
        self.image_size = np.array([heights, widths], dtype=np.float64).T[self.image_index]

    def file_name(self, k: int) -> str:
        index = self.image_index[k]
        return self.records[index].get("file_name", f"<record {index}>")


def _first(mask) -> Tuple[Optional[int], int]:
    """Index of the first True in ``mask``, and the number of Trues."""
    hits = np.flatnonzero(mask)
    return (int(hits[0]) if len(hits) else None), len(hits)


def _mode_name(mode: int) -> str:
    if mode == _MISSING:
        return "missing"
    try:
        return BoxMode(mode).name
    except ValueError:
        return str(mode)


def _box_problem(annotations: _Annotations) -> Optional[Tuple[int, str]]:
    """The first bad box as (annotation index, problem and fix), or None."""
    bboxes = annotations.bboxes
    k, _ = _first(~np.isin(annotations.modes, _SUPPORTED_BOX_MODES))
    if k is not None:
        return k, (
            f"box {bboxes[k]} has bbox_mode {_mode_name(annotations.modes[k])}, which DETR "
            "does not support. Give boxes as BoxMode.XYXY_ABS or BoxMode.XYWH_ABS when "
            "loading the dataset."
        )
    try:
        boxes = np.array(bboxes, dtype=np.float64).reshape(len(bboxes), 4)
    except ValueError:  # ragged, or not 4 values per box; rare, so found the slow way
        k = next(k for k, b in enumerate(bboxes) if np.size(b) != 4)
        return k, f"box {bboxes[k]} does not have 4 values. Fix it when loading the dataset."
    xywh = annotations.modes == int(BoxMode.XYWH_ABS)
    boxes[xywh, 2:] += boxes[xywh, :2]

    k, count = _first(~np.isfinite(boxes).all(axis=1))
    if k is not None:
        return k, (
            f"box {bboxes[k]} has a NaN or infinite coordinate ({count} such annotations in "
            "the dataset). Fix or drop these annotations when loading the dataset."
        )
    width, height = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    k, count = _first((width <= 0) | (height <= 0))
    if k is not None:
        return k, (
            f"box {bboxes[k]} has width {width[k]:g} and height {height[k]:g} ({count} "
            "annotations with a non-positive width or height in the dataset). Drop or fix "
            "them when loading the dataset: degenerate boxes make DETR's generalized-IoU "
            "loss NaN."
        )
    # NaN sizes (records without height/width) compare False, so their boxes pass.
    image_h, image_w = annotations.image_size[:, 0], annotations.image_size[:, 1]
    t = _OUTSIDE_TOLERANCE
    outside = (
        (boxes[:, 0] < -t)
        | (boxes[:, 1] < -t)
        | (boxes[:, 2] > image_w + t)
        | (boxes[:, 3] > image_h + t)
    )
    k, count = _first(outside)
    if k is not None:
        return k, (
            f"box {bboxes[k]} (XYXY {boxes[k].tolist()}) lies outside the "
            f"{image_w[k]:g}x{image_h[k]:g} (WxH) image by more than {t:g} pixel ({count} "
            "such annotations in the dataset). Check the records' height and width, and clip "
            "boxes to the image when loading the dataset."
        )
    return None


def check_dataset_dicts(dataset_dicts: List[Dict], dataset_name: str, num_classes: int) -> None:
    """
    Check training data in Detectron2's Dataset format for: an empty dataset, unsupported
    box modes, NaN/inf or degenerate boxes, boxes outside the image by more than a pixel
    (for records with "height" and "width"), and category ids outside ``[0, num_classes)``.
    Crowd annotations are skipped, as the DETR mapper drops them.

    Vectorised: COCO train2017 (118k images, 860k boxes) takes about a second.

    Args:
        dataset_dicts: the records, as returned by ``DatasetCatalog.get``.
        dataset_name: used in the messages.
        num_classes: the model's number of classes.

    Raises:
        ValueError: for the first problem found, naming the dataset, the image and the fix.
    """
    if len(dataset_dicts) == 0:
        raise DatasetError(
            f"Dataset '{dataset_name}' has no images. Check the json file and image root it "
            "was registered with, and that filtering (e.g. DATALOADER.FILTER_EMPTY_ANNOTATIONS) "
            "did not remove every image."
        )
    annotations = _Annotations(dataset_dicts)
    problem = _box_problem(annotations)
    if problem is not None:
        k, message = problem
        raise DatasetError(f"Dataset '{dataset_name}', image '{annotations.file_name(k)}': {message}")

    categories = annotations.categories
    if len(categories) == 0:
        raise DatasetError(
            f"Dataset '{dataset_name}' has {len(dataset_dicts)} images but no box annotations: there is nothing "
            "to learn. Check the json file's 'annotations' (crowd boxes are ignored).")
    k, count = _first(categories < 0)
    if k is not None:
        raise DatasetError(
            f"Dataset '{dataset_name}', image '{annotations.file_name(k)}': category id "
            f"{categories[k]} is negative ({count} such annotations). Category ids must be "
            "contiguous in [0, NUM_CLASSES): map the dataset's ids when loading it, as "
            "load_coco_json does."
        )
    k = int(categories.argmax())
    if categories[k] >= num_classes:
        raise DatasetError(
            f"NUM_CLASSES is {num_classes} but dataset '{dataset_name}' has category id "
            f"{categories[k]} (image '{annotations.file_name(k)}'); set MODEL.DETR.NUM_CLASSES "
            f"(or MODEL.DEFORMABLE_DETR.NUM_CLASSES) to at least {categories[k] + 1}."
        )


def check_num_classes(num_classes: int, dataset_name: str) -> None:
    """Refuse a model whose class count differs from the dataset's (its `thing_classes`, known once
    the dataset is loaded): Detectron2's evaluators would fail only after training."""
    classes = MetadataCatalog.get(dataset_name).get("thing_classes", None)
    if classes is not None and len(classes) != num_classes:
        raise DatasetError(
            f"NUM_CLASSES is {num_classes} but dataset '{dataset_name}' has {len(classes)} categories; set "
            f"MODEL.DETR.NUM_CLASSES (or MODEL.DEFORMABLE_DETR.NUM_CLASSES) to {len(classes)}.")


def check_evaluator_type(dataset_name: str, known) -> None:
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type not in known:
        raise DatasetError(
            f"Dataset '{dataset_name}' has evaluator_type {evaluator_type!r}; AQDETRTrainer evaluates "
            f"{sorted(known)} datasets. Register COCO-format data with register_coco_instances (it sets "
            f"'coco'), or set MetadataCatalog.get('{dataset_name}').evaluator_type.")


def check_images_readable(dataset_dicts: List[Dict], dataset_name: str, limit: int) -> None:
    """Decode every image of a dataset of at most `limit` images (0: never), so that a truncated or
    unreadable file is named before training instead of crashing it hours in."""
    if not 0 < len(dataset_dicts) <= limit:
        return
    for record in dataset_dicts:
        try:
            with Image.open(record["file_name"]) as image:
                image.load()
        except (OSError, ValueError, SyntaxError) as e:
            raise DatasetError(f"Dataset '{dataset_name}': image '{record['file_name']}' cannot be read ({e}). "
                             "Replace or remove it.") from None


def load_dataset(name: str) -> List[Dict]:
    """`DatasetCatalog.get(name)`, with the user's mistakes (an unregistered name, a json file that is
    missing or names unknown category ids) as one DatasetError."""
    try:
        return DatasetCatalog.get(name)
    except (KeyError, FileNotFoundError, json.JSONDecodeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise DatasetError(f"Dataset '{name}' cannot be loaded: {message}") from None
