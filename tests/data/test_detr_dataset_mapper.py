"""DetrDatasetMapper: shapes, box transforms, crowd/empty handling, config wiring."""
import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

from aqdetr_d2.data import DetrDatasetMapper, add_detr_input_config
from aqdetr_d2.data.shapes import write_shapes_split

HEIGHT, WIDTH = 48, 64


@pytest.fixture
def record(tmp_path):
    image = np.random.RandomState(0).randint(0, 256, size=(HEIGHT, WIDTH, 3)).astype(np.uint8)
    file_name = str(tmp_path / "image.png")
    cv2.imwrite(file_name, image)
    return {
        "file_name": file_name,
        "height": HEIGHT,
        "width": WIDTH,
        "image_id": 1,
        "annotations": [
            {"bbox": [4.0, 6.0, 20.0, 10.0], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 2},
            {"bbox": [30.0, 20.0, 60.0, 40.0], "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0},
            {
                "bbox": [0.0, 0.0, 10.0, 10.0],
                "bbox_mode": BoxMode.XYWH_ABS,
                "category_id": 1,
                "iscrowd": 1,
            },
        ],
    }


def _cfg(crop):
    cfg = get_cfg()
    add_detr_input_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (64, 80, 96)
    cfg.INPUT.MAX_SIZE_TRAIN = 160
    cfg.INPUT.MIN_SIZE_TEST = 96
    cfg.INPUT.MAX_SIZE_TEST = 160
    cfg.INPUT.DETR_CROP_PRE_RESIZE = (96, 128)
    cfg.INPUT.CROP.ENABLED = crop
    cfg.INPUT.CROP.TYPE = "absolute_range"
    cfg.INPUT.CROP.SIZE = (48, 96)
    return cfg


def test_config_default():
    cfg = get_cfg()
    add_detr_input_config(cfg)
    assert tuple(cfg.INPUT.DETR_CROP_PRE_RESIZE) == (400, 500, 600)


def test_flip_matches_hand_transformed_boxes(record):
    mapper = DetrDatasetMapper(
        is_train=True, augmentations=[T.RandomFlip(prob=1.0)], image_format="BGR"
    )
    out = mapper(record)
    expected_image = cv2.imread(record["file_name"])[:, ::-1]
    assert out["image"].dtype == torch.uint8
    assert torch.equal(out["image"], torch.from_numpy(expected_image.transpose(2, 0, 1).copy()))
    instances = out["instances"]
    assert instances.image_size == (HEIGHT, WIDTH)
    # Crowd annotation dropped; x' = W - x for both box corners.
    expected = [[WIDTH - 24, 6, WIDTH - 4, 16], [WIDTH - 60, 20, WIDTH - 30, 40]]
    assert torch.allclose(instances.gt_boxes.tensor, torch.tensor(expected, dtype=torch.float32))
    assert instances.gt_classes.tolist() == [2, 0]
    assert "annotations" not in out and (out["height"], out["width"]) == (HEIGHT, WIDTH)


def test_crop_clips_boxes_and_drops_empty_ones(record):
    # A 40x30 crop clips the second box; a 28x30 crop empties it, so it is dropped.
    mapper = DetrDatasetMapper(
        is_train=True, augmentations=[T.CropTransform(0, 0, 40, 30)], image_format="BGR"
    )
    boxes = mapper(record)["instances"].gt_boxes.tensor.tolist()
    assert boxes == [[4, 6, 24, 16], [30, 20, 40, 30]]
    mapper = DetrDatasetMapper(
        is_train=True, augmentations=[T.CropTransform(0, 0, 28, 30)], image_format="BGR"
    )
    instances = mapper(record)["instances"]
    assert instances.gt_boxes.tensor.tolist() == [[4, 6, 24, 16]]
    assert instances.gt_classes.tolist() == [2]


def test_image_without_annotations_gives_empty_instances(record):
    record["annotations"] = []
    out = DetrDatasetMapper(_cfg(crop=True), is_train=True)(record)
    assert len(out["instances"]) == 0
    assert out["instances"].gt_boxes.tensor.shape == (0, 4)
    assert out["instances"].gt_classes.shape == (0,)


def test_train_mode_keeps_boxes_inside_the_image(tmp_path):
    from detectron2.data.datasets import load_coco_json

    json_file = write_shapes_split(tmp_path, "train", 3, seed=0)
    records = load_coco_json(json_file, str(tmp_path / "train"))
    mapper = DetrDatasetMapper(_cfg(crop=True), is_train=True)
    assert [type(a) for a in mapper.augmentations.augs] == [
        T.RandomFlip,
        T.RandomApply,
        T.ResizeShortestEdge,
    ]
    shapes = set()
    np.random.seed(0)  # Detectron2's augmentations draw from numpy's global stream
    for i in range(30):
        out = mapper(records[i % len(records)])
        image, instances = out["image"], out["instances"]
        _, h, w = image.shape
        shapes.add((h, w))
        assert image.dtype == torch.uint8 and image.shape[0] == 3
        assert instances.image_size == (h, w)
        assert (out["height"], out["width"]) == (128, 128)
        assert min(h, w) in (64, 80, 96) or max(h, w) == 160
        boxes = instances.gt_boxes.tensor
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()
        # Loaded without a dataset name, so the json's ids 1..5 are kept as they are.
        assert set(instances.gt_classes.tolist()) <= {1, 2, 3, 4, 5}
    # Square outputs come from the uncropped branch, the others from a crop.
    assert any(h == w for h, w in shapes) and any(h != w for h, w in shapes)


def test_test_mode_resizes_and_drops_annotations(record):
    mapper = DetrDatasetMapper(_cfg(crop=True), is_train=False)
    out = mapper(record)
    assert out["image"].shape == (3, 96, 128)
    assert "instances" not in out and "annotations" not in out
    assert (out["height"], out["width"]) == (HEIGHT, WIDTH)
