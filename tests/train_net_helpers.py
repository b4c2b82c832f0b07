"""Run projects/AQDETR/train_net.py in-process with tiny CPU-sized models (shared by tests)."""
import copy
import importlib.util
import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser

SMALL_VAL = "shapes_val_first40"

# Small enough for a CPU test, same code paths as the real configs.
TINY = {
    "detr_fp32.yaml": ["MODEL.DETR.HIDDEN_DIM", "32", "MODEL.DETR.DIM_FEEDFORWARD", "64",
                       "MODEL.DETR.NHEADS", "4", "MODEL.DETR.ENC_LAYERS", "1", "MODEL.DETR.DEC_LAYERS", "2"],
    "deformable_detr_fp32.yaml": ["MODEL.DEFORMABLE_DETR.HIDDEN_DIM", "32",
                                  "MODEL.DEFORMABLE_DETR.DIM_FEEDFORWARD", "64",
                                  "MODEL.DEFORMABLE_DETR.NHEADS", "4", "MODEL.DEFORMABLE_DETR.ENC_LAYERS", "1",
                                  "MODEL.DEFORMABLE_DETR.DEC_LAYERS", "2"],
}
# The shapes DETR without its convergence aids (the papers' DETR, on res5), for tests whose
# per-query comparisons a two-stage query selection would reorder.
PLAIN_DETR = ["MODEL.DETR.TWO_STAGE", "False", "MODEL.DETR.BOX_REFINE", "False", "MODEL.DETR.FOCAL_LOSS", "False",
              "MODEL.DETR.SPATIAL_PRIOR", "False", "MODEL.DETR.IN_FEATURE", "res5",
              "MODEL.RESNETS.OUT_FEATURES", "['res5']"]
COMMON = ["MODEL.DEVICE", "cpu", "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(96,)",
          "INPUT.MIN_SIZE_TEST", "96", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0"]


def _run(train_net, config, output_dir, *extra, flags=()):
    """train_net.main on configs/shapes/`config` (a teacher config or its W4A4A4 student), tiny."""
    tiny = TINY[config] if config in TINY else TINY[next(k for k, v in STUDENTS.items() if v == config)]
    args = default_argument_parser().parse_args(
        ["--config-file", os.path.join(os.path.dirname(train_net.__file__), "..", "..", "configs", "shapes", config),
         *flags, *COMMON, *tiny, "OUTPUT_DIR", str(output_dir), "DATASETS.TEST", f"('{SMALL_VAL}',)", *extra])
    return train_net.main(args)


def _log(output_dir):
    with open(os.path.join(output_dir, "log.txt")) as f:
        return f.read()


def load_script(path: str, name: str):
    """A script that is not part of a package (tools/*.py, train_net.py), imported as module `name`."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_train_net(project_root):
    """projects/AQDETR/train_net.py as a module, with a small validation split registered."""
    module = load_script(os.path.join(project_root, "projects", "AQDETR", "train_net.py"), "aqdetr_train_net")
    if SMALL_VAL not in DatasetCatalog.list():
        DatasetCatalog.register(SMALL_VAL, lambda: copy.deepcopy(DatasetCatalog.get("shapes_val")[:40]))
        MetadataCatalog.get(SMALL_VAL).set(thing_classes=MetadataCatalog.get("shapes_val").thing_classes,
                                           evaluator_type="coco")
    return module


NODES = {"detr_fp32.yaml": "DETR", "deformable_detr_fp32.yaml": "DEFORMABLE_DETR"}
STUDENTS = {"detr_fp32.yaml": "aqdetr_w4a4.yaml", "deformable_detr_fp32.yaml": "aq_deformable_detr_w4a4.yaml"}


def write_teacher(train_net, config, tmp_path, project_root):
    """Train a tiny float teacher for 2 steps; returns (teacher yaml, teacher checkpoint, student opts)."""
    teacher_dir = tmp_path / "teacher"
    _run(train_net, config, teacher_dir, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()")
    tiny = TINY[config]
    lines = [f'_BASE_: "{os.path.join(project_root, "configs", "shapes", config)}"', "MODEL:",
             f"  {NODES[config]}:"]
    lines += [f"    {k.split('.')[-1]}: {v}" for k, v in zip(tiny[::2], tiny[1::2])]
    yaml = tmp_path / "teacher.yaml"
    yaml.write_text("\n".join(lines) + "\n")
    weights = str(teacher_dir / "model_final.pth")
    student = ["MODEL.WEIGHTS", weights, "MODEL.DISTILL.TEACHER_CONFIG", str(yaml),
               "MODEL.DISTILL.TEACHER_WEIGHTS", weights, "MODEL.QUANT.CALIB_BATCHES", "1",
               "MODEL.AUX_QUERIES.NUM_QUERIES", "60"]
    return str(yaml), weights, student


def student_cfg(make_cfg, config, extra):
    """The tiny W4A4A4 AQ-DETR student of teacher `config` (a `make_cfg` config), with `extra` options."""
    return make_cfg(os.path.join("shapes", STUDENTS[config]), *COMMON[2:], *TINY[config], *extra)
