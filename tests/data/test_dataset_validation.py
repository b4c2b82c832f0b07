"""check_dataset_dicts: each problem is reported with the dataset, the image and the fix."""
import math

import pytest
from detectron2.structures import BoxMode

from aqdetr_d2.data import check_dataset_dicts


def _dataset(bbox=(10.0, 10.0, 20.0, 20.0), mode=BoxMode.XYWH_ABS, category_id=1, **extra):
    good = {"bbox": [1.0, 1.0, 5.0, 5.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
    odd = {"bbox": list(bbox), "bbox_mode": mode, "category_id": category_id, **extra}
    return [
        {"file_name": "a.png", "height": 100, "width": 80, "annotations": [good]},
        {"file_name": "b.png", "height": 100, "width": 80, "annotations": [good, odd]},
        {"file_name": "c.png", "height": 100, "width": 80, "annotations": []},
    ]


def test_valid_dataset_passes():
    check_dataset_dicts(_dataset(), "ok", num_classes=2)
    # XYXY boxes touching the border, and boxes over the border within a pixel, are fine.
    check_dataset_dicts(_dataset((0, 0, 80, 100), BoxMode.XYXY_ABS), "ok", 2)
    check_dataset_dicts(_dataset((-0.5, 0, 80.9, 100), BoxMode.XYXY_ABS), "ok", 2)


def test_empty_dataset():
    with pytest.raises(ValueError, match="Dataset 'x' has no images. Check the json file"):
        check_dataset_dicts([], "x", 2)


@pytest.mark.parametrize(
    "bbox, mode, message",
    [
        ((10, 10, 0, 5), BoxMode.XYWH_ABS, "has width 0 and height 5"),
        ((10, 10, 5, 5), BoxMode.XYXY_ABS, "has width -5 and height -5"),
        ((10, math.nan, 5, 5), BoxMode.XYWH_ABS, "NaN or infinite coordinate"),
        ((10, 10, math.inf, 5), BoxMode.XYWH_ABS, "NaN or infinite coordinate"),
        ((70, 10, 20, 5), BoxMode.XYWH_ABS, "outside the 80x100 .WxH. image by more than 1"),
        ((-3, 10, 20, 5), BoxMode.XYWH_ABS, "outside the 80x100"),
        ((0.1, 0.1, 0.3, 0.3), BoxMode.XYXY_REL, "bbox_mode XYXY_REL, which DETR does not"),
        ((10, 10, 20, 5, 30), BoxMode.XYWHA_ABS, "bbox_mode XYWHA_ABS"),
        ((10, 10, 20), BoxMode.XYWH_ABS, "does not have 4 values"),
    ],
)
def test_bad_boxes(bbox, mode, message):
    with pytest.raises(ValueError, match=f"Dataset 'x', image 'b.png': .*{message}") as e:
        check_dataset_dicts(_dataset(bbox, mode), "x", 2)
    assert "when loading the dataset" in str(e.value)


def test_missing_bbox_mode():
    dataset = _dataset()
    del dataset[1]["annotations"][1]["bbox_mode"]
    with pytest.raises(ValueError, match="image 'b.png': .* has bbox_mode missing"):
        check_dataset_dicts(dataset, "x", 2)


def test_too_many_categories():
    expected = (
        "NUM_CLASSES is 3 but dataset 'x' has category id 4 (image 'b.png'); set "
        "MODEL.DETR.NUM_CLASSES (or MODEL.DEFORMABLE_DETR.NUM_CLASSES) to at least 5."
    )
    with pytest.raises(ValueError) as e:
        check_dataset_dicts(_dataset(category_id=4), "x", 3)
    assert str(e.value) == expected


def test_negative_category():
    with pytest.raises(ValueError, match="image 'b.png': category id -1 is negative"):
        check_dataset_dicts(_dataset(category_id=-1), "x", 3)


def test_crowd_annotations_and_records_without_size_are_not_checked():
    check_dataset_dicts(_dataset((10, 10, 0, 0), category_id=9, iscrowd=1), "x", 2)
    dataset = _dataset((500, 500, 20, 20))
    for record in dataset:
        del record["height"], record["width"]
    check_dataset_dicts(dataset, "x", 2)
