"""Your own COCO-format data from the config: `DATASETS.COCO_INSTANCES` entries are registered
with Detectron2's `register_coco_instances` (so they get evaluator_type "coco")."""
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

__all__ = ["register_config_datasets"]


def register_config_datasets(cfg) -> None:
    """Register every [name, json_file, image_root] of `cfg.DATASETS.COCO_INSTANCES`; an entry
    already registered with the same files is kept, one registered otherwise is refused."""
    for entry in cfg.DATASETS.COCO_INSTANCES:
        if len(entry) != 3 or not all(isinstance(v, str) for v in entry):
            raise ValueError(f"DATASETS.COCO_INSTANCES entries are [name, json_file, image_root]; got {entry!r}")
        name, json_file, image_root = entry
        if name in DatasetCatalog.list():
            meta = MetadataCatalog.get(name)
            if (meta.get("json_file", None), meta.get("image_root", None)) != (json_file, image_root):
                raise ValueError(f"dataset '{name}' in DATASETS.COCO_INSTANCES is already registered with other "
                                 "files; give your dataset another name")
            continue
        register_coco_instances(name, {}, json_file, image_root)
