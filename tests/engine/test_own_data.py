"""Your own COCO-format data, end to end: real photos (matplotlib's sample photo of Grace Hopper,
cropped and flipped) registered through DATASETS.COCO_INSTANCES, trained, evaluated, quantized;
its mistakes refused before training; a checkpoint fine-tuned to its class count."""
import json
import os

import matplotlib
import pytest
import torch
from PIL import Image

from detectron2.modeling import build_model

from aqdetr_d2.checkpoint import AQDETRCheckpointer
from train_net_helpers import COMMON, TINY, _log, _run

PHOTO = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")  # 512 x 600
# (left, top, right, bottom) of the photo's face and of her cap's badge, in the full photo.
FACE, BADGE = (175, 90, 345, 290), (220, 25, 290, 80)
# COCO ids need not be contiguous: Detectron2 maps them to 0..K-1.
CATEGORIES = [{"id": 3, "name": "face"}, {"id": 8, "name": "badge"}]


def _write_split(root, name, crops, boxes=True, edit=None):
    """Crops (left, top, size, flip) of the photo as JPEGs, with their boxes in a COCO json."""
    photo = Image.open(PHOTO).convert("RGB")
    images, annotations = [], []
    for i, (left, top, size, flip) in enumerate(crops):
        image = photo.crop((left, top, left + size, top + size)).resize((96, 96))
        if flip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        file_name = f"{name}_{i}.jpg"
        image.save(root / file_name)
        images.append({"id": i + 1, "file_name": file_name, "width": 96, "height": 96})
        for category, (x0, y0, x1, y1) in zip((3, 8), (FACE, BADGE)) if boxes else ():
            s = 96 / size
            x0, x1 = sorted(((x0 - left) * s, (x1 - left) * s))
            if flip:
                x0, x1 = 96 - x1, 96 - x0
            y0, y1 = (y0 - top) * s, (y1 - top) * s
            x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, 96), min(y1, 96)
            if x1 - x0 > 2 and y1 - y0 > 2:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": category,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    if edit:
        edit(data)
    path = root / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("own_data")
    train = _write_split(root, "train", [(0, 0, 512, False), (40, 10, 420, True), (60, 40, 400, False),
                                          (0, 0, 512, True)])
    # An image without boxes (a crop below the face) among the validation images.
    val = _write_split(root, "val", [(20, 5, 460, False), (30, 20, 440, True)])
    empty = _write_split(root, "empty", [(0, 300, 200, False)], boxes=False)
    val_data = json.loads(open(val).read())
    val_data["images"].append({**json.loads(open(empty).read())["images"][0], "id": 3})
    open(val, "w").write(json.dumps(val_data))
    return root, train, val


def _own(root, train, val, train_name="photos_train", val_name="photos_val"):
    return ["DATASETS.COCO_INSTANCES", repr([[train_name, train, str(root)], [val_name, val, str(root)]]),
            "DATASETS.TRAIN", f"('{train_name}',)", "DATASETS.TEST", f"('{val_name}',)",
            "MODEL.DETR.NUM_CLASSES", "2", "MODEL.DETR.NUM_OBJECT_QUERIES", "10"]


def test_train_evaluate_and_quantize_on_your_own_photos(train_net, own_data, tmp_path):
    root, train, val = own_data
    results = _run(train_net, "detr_fp32.yaml", tmp_path / "float", "SOLVER.MAX_ITER", "3", *_own(root, train, val))
    assert set(results["bbox"]) >= {"AP", "AP-face", "AP-badge"}  # evaluated by COCOEvaluator
    quant = ["MODEL.QUANT.ENABLED", "True", "MODEL.QUANT.CALIB_BATCHES", "1"]
    _run(train_net, "detr_fp32.yaml", tmp_path / "w4", "SOLVER.MAX_ITER", "2", *quant, *_own(root, train, val),
         "MODEL.WEIGHTS", str(tmp_path / "float" / "model_final.pth"))
    assert "Initialised" in _log(tmp_path / "w4")


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["annotations"][1]["bbox"].__setitem__(2, 0.0), r"image '[^']*_0.jpg': box .* has width 0"),
    (lambda d: d["annotations"][0].__setitem__("category_id", 5), r"category_id=5.*does not exist"),
    (lambda d: d.__setitem__("annotations", []), "no box annotations"),
])
def test_mistakes_in_your_own_data_are_refused_before_training(train_net, own_data, tmp_path, edit, match):
    root, _, val = own_data
    name = f"photos_bad_{abs(hash(match)) % 10000}"
    bad = _write_split(root, name, [(0, 0, 512, False), (40, 10, 420, True)], edit=edit)
    with pytest.raises(SystemExit, match=match):
        _run(train_net, "detr_fp32.yaml", tmp_path, *_own(root, bad, val, train_name=name))
    assert not os.path.exists(tmp_path / "model_final.pth")


def test_a_checkpoint_fine_tunes_to_your_class_count(train_net, own_data, make_cfg, tmp_path):
    root, train, val = own_data
    _run(train_net, "detr_fp32.yaml", tmp_path / "shapes", "SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()",
         "MODEL.DETR.NUM_OBJECT_QUERIES", "10")
    shapes_model = str(tmp_path / "shapes" / "model_final.pth")
    with pytest.raises(SystemExit, match="MODEL.REINIT_CLASS_HEADS True"):
        _run(train_net, "detr_fp32.yaml", tmp_path / "refused", "MODEL.WEIGHTS", shapes_model, *_own(root, train, val))
    _run(train_net, "detr_fp32.yaml", tmp_path / "fine_tuned", "SOLVER.MAX_ITER", "1", "MODEL.WEIGHTS", shapes_model,
         "MODEL.REINIT_CLASS_HEADS", "True", *_own(root, train, val))
    assert "class-head tensors of another class count keep their initialisation" in _log(tmp_path / "fine_tuned")

    # Only the class heads keep their initialisation; every other tensor comes from the checkpoint.
    cfg = make_cfg("shapes/detr_fp32.yaml", *COMMON[2:], *TINY["detr_fp32.yaml"], "MODEL.DETR.NUM_CLASSES", "2",
                   "MODEL.DETR.NUM_OBJECT_QUERIES", "10")
    model = build_model(cfg)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    AQDETRCheckpointer(model, reinit_class_heads=True).load(shapes_model)
    saved = torch.load(shapes_model, map_location="cpu", weights_only=True)["model"]
    for key, value in model.state_dict().items():
        expected = initial[key] if "class_embed" in key else saved[key]
        assert torch.equal(value, expected), key
    assert any("class_embed" in k for k in initial)
