#!/usr/bin/env python
"""Confident predictions and the duplicates among them, for one or more checkpoints of a config.

    python tools/duplicate_predictions.py --config-file configs/shapes/aq_deformable_detr_w3a3.yaml \\
        --weights output/qs_w3a3/lsq_seed1/model_final.pth --weights output/qs_w3a3/aux_seed1/model_final.pth \\
        --num-images 200 MODEL.BACKBONE.NAME build_narrow_resnet_backbone ...

A set-prediction detector has no NMS: one-to-one matching is what teaches it to give each object
one confident query. One-to-many supervision (hybrid auxiliary queries) rewards several queries
per object through the shared heads, so a model that learned it shows up here as more
duplicates: confident predictions (score >= --score) whose box overlaps a higher-scoring confident
prediction of the same class by IoU > --iou. Runs on the first --num-images of DATASETS.TEST[0].
"""
import argparse
import logging

import torch

from detectron2.data import DatasetCatalog
from detectron2.structures import Instances, pairwise_iou

from aqdetr_d2.config import load_config
from aqdetr_d2.data import DetrDatasetMapper
from aqdetr_d2.engine import build_calibrated_model
from aqdetr_d2.errors import user_errors_exit


def count_duplicates(instances: Instances, score: float, iou: float):
    """(confident predictions, duplicates among them) of one image's predicted `instances`."""
    confident = instances[instances.scores >= score]
    confident = confident[confident.scores.argsort(descending=True)]
    overlap = pairwise_iou(confident.pred_boxes, confident.pred_boxes)
    same_class = confident.pred_classes[:, None] == confident.pred_classes[None, :]
    # Sorted by score, so entry (i, j) above the diagonal pairs prediction j with a better one, i.
    covered = ((overlap > iou) & same_class).triu(diagonal=1).any(dim=0)
    return len(confident), int(covered.sum())


@torch.no_grad()
def duplicate_table(cfg, weights, num_images: int, score: float, iou: float):
    """Per checkpoint: images, ground-truth boxes, confident predictions, duplicates."""
    name = cfg.DATASETS.TEST[0]
    dicts = DatasetCatalog.get(name)[:num_images]
    mapper = DetrDatasetMapper(cfg, is_train=False)
    inputs = [mapper(d) for d in dicts]
    ground_truth = sum(len(d["annotations"]) for d in dicts)
    rows = []
    for path in weights:
        model = build_calibrated_model(cfg, path)
        confident = duplicates = 0
        for start in range(0, len(inputs), cfg.SOLVER.IMS_PER_BATCH):
            for output in model(inputs[start:start + cfg.SOLVER.IMS_PER_BATCH]):
                c, d = count_duplicates(output["instances"], score, iou)
                confident, duplicates = confident + c, duplicates + d
        rows.append({"weights": path, "images": len(dicts), "ground_truth": ground_truth,
                     "confident": confident, "duplicates": duplicates})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--weights", action="append", required=True, metavar="PATH",
                        help="a checkpoint of a model the config builds; repeat for several")
    parser.add_argument("--num-images", type=int, default=200)
    parser.add_argument("--score", type=float, default=0.3, help="confidence threshold")
    parser.add_argument("--iou", type=float, default=0.6, help="same-class overlap that makes a duplicate")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Predictions need neither the training-only auxiliary queries nor the teacher.
    cfg = load_config(args.config_file, [*args.opts, "MODEL.AUX_QUERIES.ENABLED", "False",
                                         "MODEL.DISTILL.ENABLED", "False"])
    if not cfg.DATASETS.TEST:
        raise SystemExit("error: the config has no DATASETS.TEST")
    rows = duplicate_table(cfg, args.weights, args.num_images, args.score, args.iou)
    print(f"# score >= {args.score}, same-class IoU > {args.iou}, first {args.num_images} images of "
          f"{cfg.DATASETS.TEST[0]}\n")
    print("| weights | ground-truth boxes | confident predictions | duplicates |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} | {r['ground_truth']} | {r['confident']} | {r['duplicates']} |")


if __name__ == "__main__":
    with user_errors_exit():  # a bad checkpoint, dataset or key: one line, exit 2
        main()
