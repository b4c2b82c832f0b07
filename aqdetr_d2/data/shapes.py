"""
The synthetic "shapes" detection dataset: small images of circles, squares, triangles, stars
and crosses on textured backgrounds, in COCO format.

It is generated on first use under ``$DETECTRON2_DATASETS/shapes`` (default
``datasets/shapes``), byte-for-byte identical on every machine, and registered with
Detectron2 as ``shapes_train``, ``shapes_val`` and ``shapes_holdout``::

    shapes/
      train/000001.png ...
      val/000001.png ...
      holdout/000001.png ...
      annotations/instances_{train,val,holdout}.json
"""
import fcntl
import functools
import json
import logging
import os
import shutil
import time

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .png import encode_png
from .shapes_render import IMAGE_SIZE, SHAPES_CLASSES, render_scene

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_SPLITS",
    "default_shapes_root",
    "write_shapes_split",
    "prepare_shapes_split",
    "register_shapes",
]

logger = logging.getLogger(__name__)

# Dataset name -> (split directory, number of images, seed). Different seeds keep the splits
# disjoint. "shapes_holdout" is for choosing a setting from measured curves, so that the AP
# reported on shapes_val never saw the choice.
SHAPES_SPLITS = {
    "shapes_train": ("train", 2000, 0),
    "shapes_val": ("val", 1000, 1),
    "shapes_holdout": ("holdout", 1000, 2),
}
# Bump when the rendering changes, so that stale copies can be told apart.
_VERSION = "1"


def default_shapes_root():
    """``$DETECTRON2_DATASETS/shapes``, read when called (not at import)."""
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "shapes")


def _annotation_file(root, split):
    return os.path.join(root, "annotations", f"instances_{split}.json")


def write_shapes_split(output_dir, split, num_images, seed):
    """
    Render one split into ``output_dir/{split}/*.png`` and
    ``output_dir/annotations/instances_{split}.json``.

    Image ``i`` is drawn from its own stream seeded with ``(seed, i)``, so a split with fewer
    images is a prefix of a larger one. The legacy ``RandomState`` is used on purpose: its
    streams are frozen across numpy versions, unlike those of ``numpy.random.Generator``.
    This writes in place and is not safe under concurrency; see :func:`prepare_shapes_split`.

    Returns:
        str: path of the annotation json.
    """
    image_dir = os.path.join(output_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(output_dir, "annotations"), exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image, objects = render_scene(np.random.RandomState([seed, index]), IMAGE_SIZE)
        image_id = index + 1
        file_name = f"{image_id:06d}.png"
        with open(os.path.join(image_dir, file_name), "wb") as f:
            f.write(encode_png(image))
        images.append(
            {"id": image_id, "file_name": file_name, "height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
        for obj in objects:
            x0, y0, x1, y1 = obj.box
            annotations.append(
                {
                    # COCO ids start at 1; pycocotools treats id 0 as "no match".
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": obj.category + 1,
                    "bbox": [x0, y0, round(x1 - x0, 2), round(y1 - y0, 2)],
                    "area": obj.area,
                    "iscrowd": 0,
                }
            )
    content = {
        "info": {"description": f"AQ-DETR synthetic shapes, {split} split", "version": _VERSION},
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": i + 1, "name": name, "supercategory": "shape"}
            for i, name in enumerate(SHAPES_CLASSES)
        ],
    }
    json_file = _annotation_file(output_dir, split)
    with open(json_file, "w") as f:
        json.dump(content, f)
    return json_file


def prepare_shapes_split(root, split, num_images, seed):
    """
    Make sure ``root`` holds the split, generating it if needed; safe to call from several
    processes at once (e.g. one per DDP rank).

    The annotation json is the completion marker: it is moved into place last, after the
    image directory, so a reader never sees a partial split. One process generates under an
    exclusive POSIX ``flock`` on ``root/.{split}.lock``; the others wait, then find the json.

    Returns:
        str: path of the annotation json.
    """
    json_file = _annotation_file(root, split)
    if os.path.isfile(json_file):
        return json_file  # also the path for read-only copies generated elsewhere
    try:
        os.makedirs(root, exist_ok=True)
        lock = open(os.path.join(root, f".{split}.lock"), "w")
    except OSError as e:
        raise RuntimeError(
            f"Cannot generate the synthetic shapes dataset in '{root}': {e}. Set the "
            "DETECTRON2_DATASETS environment variable to a writable directory (the data goes "
            "to $DETECTRON2_DATASETS/shapes), or generate it once where it is writable."
        ) from e
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(json_file):
            return json_file  # another process finished while we waited
        # Left-overs of a process killed while holding the lock are incomplete by construction.
        staging = os.path.join(root, f".{split}.tmp")
        image_dir = os.path.join(root, split)
        for stale in (staging, image_dir):
            shutil.rmtree(stale, ignore_errors=True)
        logger.info(f"Generating {num_images} synthetic shapes images for '{split}' in {root} ...")
        start = time.perf_counter()
        staged_json = write_shapes_split(staging, split, num_images, seed)
        os.rename(os.path.join(staging, split), image_dir)
        os.makedirs(os.path.dirname(json_file), exist_ok=True)
        os.replace(staged_json, json_file)
        shutil.rmtree(staging)
        logger.info(f"Generated '{split}' in {time.perf_counter() - start:.1f} s.")
    return json_file


def _load_shapes(dataset_name, root):
    split, num_images, seed = SHAPES_SPLITS[dataset_name]
    json_file = prepare_shapes_split(root, split, num_images, seed)
    return load_coco_json(json_file, os.path.join(root, split), dataset_name)


def register_shapes(root=None):
    """
    Register the shapes splits (``SHAPES_SPLITS``) with Detectron2's catalogs.

    Nothing is generated here: the data is created the first time a dataset is loaded
    through ``DatasetCatalog.get``. Calling this again with the same root does nothing; with
    another root it points the names there (e.g. after changing DETECTRON2_DATASETS).

    Args:
        root (str or None): dataset directory; defaults to :func:`default_shapes_root`.
    """
    root = os.fspath(root) if root is not None else default_shapes_root()
    for name, (split, _, _) in SHAPES_SPLITS.items():
        json_file = _annotation_file(root, split)
        if name in DatasetCatalog.list():
            if MetadataCatalog.get(name).get("json_file") == json_file:
                continue
            # Metadata refuses to change a set value, so both entries are replaced.
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, functools.partial(_load_shapes, name, root))
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPES_CLASSES),
            # Known before loading, so an evaluator built first maps ids the same way.
            thing_dataset_id_to_contiguous_id={i + 1: i for i in range(len(SHAPES_CLASSES))},
            json_file=json_file,
            image_root=os.path.join(root, split),
            evaluator_type="coco",
        )
