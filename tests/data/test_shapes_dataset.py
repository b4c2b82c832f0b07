"""The synthetic shapes dataset: determinism, COCO validity, safe preparation, registration."""
import io
import json
import os
import threading

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from pycocotools.coco import COCO

from aqdetr_d2.data import SHAPES_CLASSES, prepare_shapes_split, register_shapes
from aqdetr_d2.data import shapes as shapes_module
from aqdetr_d2.data.png import encode_png
from aqdetr_d2.data.shapes import write_shapes_split


def _files(directory):
    return {
        os.path.relpath(os.path.join(d, f), directory): open(os.path.join(d, f), "rb").read()
        for d, _, names in os.walk(directory)
        for f in names
    }


def test_generation_is_deterministic(tmp_path):
    write_shapes_split(tmp_path / "a", "train", 20, seed=0)
    write_shapes_split(tmp_path / "b", "train", 20, seed=0)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 21 and a == b

    # Each image has its own stream, so a shorter split is a prefix of a longer one.
    write_shapes_split(tmp_path / "short", "train", 5, seed=0)
    short = _files(tmp_path / "short")
    assert all(short[name] == a[name] for name in short if name.endswith(".png"))

    write_shapes_split(tmp_path / "other", "train", 5, seed=1)
    other = _files(tmp_path / "other")
    assert all(other[name] != a[name] for name in other if name.endswith(".png"))


def test_annotations_are_valid_coco(tmp_path):
    json_file = write_shapes_split(tmp_path, "val", 40, seed=1)
    coco = COCO(json_file)
    assert sorted(coco.getCatIds()) == [1, 2, 3, 4, 5]
    assert [c["name"] for c in coco.loadCats([1, 2, 3, 4, 5])] == list(SHAPES_CLASSES)
    assert sorted(coco.getImgIds()) == list(range(1, 41))
    annotations = coco.loadAnns(coco.getAnnIds())
    assert sorted(a["id"] for a in annotations) == list(range(1, len(annotations) + 1))
    assert {a["category_id"] for a in annotations} == {1, 2, 3, 4, 5}

    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        image = cv2.imread(os.path.join(tmp_path, "val", info["file_name"]))
        assert image.shape == (info["height"], info["width"], 3) == (128, 128, 3)
        assert 1 <= len(coco.getAnnIds(imgIds=image_id)) <= 6
    for a in annotations:
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 128 + 1e-6 and y + h <= 128 + 1e-6
        assert 9.9 <= max(w, h) <= 60.1 and min(w, h) > 0
        assert 0 < a["area"] <= w * h and a["iscrowd"] == 0


def test_png_round_trip():
    # 200 px wide rows take more than one stored deflate block (65535 bytes).
    image = np.random.RandomState(0).randint(0, 256, size=(150, 200, 3)).astype(np.uint8)
    with_cv2 = cv2.imdecode(np.frombuffer(encode_png(image), np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(with_cv2[:, :, ::-1], image)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(image)))), image)


def test_prepare_generates_once_under_concurrency(tmp_path, monkeypatch):
    calls = []
    write = shapes_module.write_shapes_split

    def counting_write(*args, **kwargs):
        calls.append(args)
        return write(*args, **kwargs)

    monkeypatch.setattr(shapes_module, "write_shapes_split", counting_write)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(prepare_shapes_split(tmp_path, "val", 6, 1)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [os.path.join(tmp_path, "annotations", "instances_val.json")] * 3
    assert len(os.listdir(tmp_path / "val")) == 6
    assert not (tmp_path / ".val.tmp").exists()


def test_prepare_replaces_leftovers_of_an_interrupted_run(tmp_path):
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "junk.png").write_bytes(b"")
    (tmp_path / ".val.tmp").mkdir()
    json_file = prepare_shapes_split(tmp_path, "val", 3, 1)
    assert sorted(os.listdir(tmp_path / "val")) == ["000001.png", "000002.png", "000003.png"]
    assert len(json.load(open(json_file))["images"]) == 3
    assert not (tmp_path / ".val.tmp").exists()


def test_unwritable_root_names_the_environment_variable(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    with pytest.raises(RuntimeError, match="DETECTRON2_DATASETS"):
        prepare_shapes_split(not_a_directory / "shapes", "val", 2, 1)


@pytest.fixture
def restore_registration():
    """Point the shapes datasets back where the package import registered them."""
    json_file = MetadataCatalog.get("shapes_train").json_file
    yield
    register_shapes(os.path.dirname(os.path.dirname(json_file)))


def test_registration_is_lazy_and_loads(tmp_path, monkeypatch, restore_registration):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    monkeypatch.setitem(shapes_module.SHAPES_SPLITS, "shapes_train", ("train", 4, 0))
    monkeypatch.setitem(shapes_module.SHAPES_SPLITS, "shapes_val", ("val", 3, 1))
    register_shapes()
    register_shapes()  # idempotent
    root = tmp_path / "shapes"
    assert not root.exists()

    meta = MetadataCatalog.get("shapes_val")
    assert meta.thing_classes == list(SHAPES_CLASSES)
    assert meta.evaluator_type == "coco"
    assert meta.json_file == str(root / "annotations" / "instances_val.json")
    assert meta.image_root == str(root / "val")

    records = DatasetCatalog.get("shapes_val")
    assert len(records) == 3 and not (root / "train").exists()
    for record in records:
        assert os.path.isfile(record["file_name"])
        assert {a["category_id"] for a in record["annotations"]} <= set(range(5))
    assert meta.thing_dataset_id_to_contiguous_id == {i + 1: i for i in range(5)}


def test_registered_splits_have_their_own_images(tmp_path):
    """Every registered split renders from its own seed into its own folder: the holdout images
    used to choose settings are none of the validation images AP is reported on."""
    splits = shapes_module.SHAPES_SPLITS
    assert len({seed for _, _, seed in splits.values()}) == len(splits)
    assert len({directory for directory, _, _ in splits.values()}) == len(splits)
    pixels = {}
    for name in ("shapes_val", "shapes_holdout"):
        directory, _, seed = splits[name]
        write_shapes_split(tmp_path, directory, 3, seed)
        pixels[name] = [cv2.imread(str(tmp_path / directory / f"{i:06d}.png")) for i in (1, 2, 3)]
    assert all(not np.array_equal(v, h) for v in pixels["shapes_val"] for h in pixels["shapes_holdout"])
    assert "shapes_holdout" in DatasetCatalog.list()
