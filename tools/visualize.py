#!/usr/bin/env python
"""Pictures of a model: detections, float-vs-quantized attention, float-vs-quantized query values.

    # predictions beside the ground truth, first 4 images of the dataset (a grid, one row per image)
    python tools/visualize.py predictions --config-file configs/shapes/detr_lsq_w4a4.yaml \\
        --output out/predictions.png MODEL.WEIGHTS output/shapes/detr_lsq_w4a4/model_final.pth
    # attention of the float teacher and the quantized student, side by side, for one image
    python tools/visualize.py attention --config-file configs/shapes/aqdetr_w4a4.yaml \\
        --teacher-config configs/shapes/detr_fp32.yaml --teacher-weights output/shapes/detr_fp32/model_final.pth \\
        --output out/attention.png MODEL.WEIGHTS output/shapes/aqdetr_w4a4/model_final.pth
    # histograms of the decoder query states, teacher vs student, one subplot per decoder layer
    python tools/visualize.py histograms --config-file configs/shapes/aqdetr_w4a4.yaml \\
        --teacher-config configs/shapes/detr_fp32.yaml --teacher-weights output/shapes/detr_fp32/model_final.pth \\
        --output out/histograms.png MODEL.WEIGHTS output/shapes/aqdetr_w4a4/model_final.pth

Trailing KEY VALUE overrides apply to --config-file (the student). The model is built from the
config, MODEL.WEIGHTS is loaded with AQDETRCheckpointer, and quantizers a float checkpoint
leaves unset are calibrated on MODEL.QUANT.CALIB_BATCHES batches of DATASETS.TRAIN[0], as
train_net does. --teacher-config / --teacher-weights default to MODEL.DISTILL.TEACHER_CONFIG /
TEACHER_WEIGHTS of the student config (the AQ-DETR configs set them); the teacher is built as
for distillation (float, same architecture and sizes, checked). Images go through the test
mapper (test-time resize); the dataset defaults to DATASETS.TEST[0].

attention: DETR panels show the decoder cross-attention of the teacher's top-scoring queries
(averaged over heads, bilinearly upsampled over the image, with the query's box) and, in the
last column, the encoder self-attention of the feature cell at the centre of the best box.
Deformable-DETR panels show every sampling location (head x level x point) of each top query,
a dot whose area is its attention weight, one colour per feature level. With learned queries
both models show the teacher's top queries (same indices); two-stage models select their own
queries from their encoder, so each shows its own top queries.
"""
import argparse
import logging
import math
import os
import sys
from typing import Dict, List, Optional

import numpy as np
import torch

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import convert_image_to_rgb, read_image

from aqdetr_d2.config import load_config
from aqdetr_d2.data import DetrDatasetMapper
from aqdetr_d2.distill.teacher import build_teacher
from aqdetr_d2.engine import build_calibrated_model
from aqdetr_d2.layers.box_ops import box_cxcywh_to_xyxy
from aqdetr_d2.utils import charts
from aqdetr_d2.utils import visualization as vis
from aqdetr_d2.errors import user_errors_exit



# --------------------------------------------------------------------------- models and data

def build_float_teacher(cfg, teacher_config: Optional[str], teacher_weights: Optional[str]) -> torch.nn.Module:
    """The float teacher, built and checked as for distillation (`build_teacher`)."""
    tcfg = cfg.clone()
    tcfg.defrost()
    if teacher_config:
        tcfg.MODEL.DISTILL.TEACHER_CONFIG = teacher_config
    if teacher_weights:
        tcfg.MODEL.DISTILL.TEACHER_WEIGHTS = teacher_weights
    if not tcfg.MODEL.DISTILL.TEACHER_CONFIG or not tcfg.MODEL.DISTILL.TEACHER_WEIGHTS:
        raise SystemExit("error: give --teacher-config and --teacher-weights (the student config sets no "
                         "MODEL.DISTILL.TEACHER_CONFIG / TEACHER_WEIGHTS)")
    return build_teacher(tcfg).eval()


def dataset_images(cfg, dataset: Optional[str], count: int, start: int = 0):
    """(dataset name, metadata, the dataset dicts [start, start + count), the test-mapped inputs)."""
    name = dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if not name:
        raise SystemExit("error: give --dataset (the config has no DATASETS.TEST)")
    dicts = DatasetCatalog.get(name)
    if start >= len(dicts):
        raise SystemExit(f"error: image index {start} is out of range: '{name}' has {len(dicts)} images")
    dicts = dicts[start:start + count]
    mapper = DetrDatasetMapper(cfg, is_train=False)
    return name, MetadataCatalog.get(name), dicts, [mapper(d) for d in dicts]


@torch.no_grad()
def run_predict(model, inputs: List[Dict]):
    """`model.predict` on the preprocessed batch: (ImageList, outputs)."""
    images = model.preprocess_image(inputs)
    return images, model.predict(images)


def is_deformable(model) -> bool:
    return hasattr(model, "detector")


def is_two_stage(model) -> bool:
    """Decoder queries selected from encoder proposals (they differ between two models)."""
    return model.detector.two_stage if is_deformable(model) else model.two_stage


def input_rgb(cfg, inputs: Dict) -> np.ndarray:
    """The (test-resized) model input of one image as RGB uint8 (H, W, 3)."""
    return convert_image_to_rgb(inputs["image"].permute(1, 2, 0).cpu().numpy(), cfg.INPUT.FORMAT).astype(np.uint8)


def boxes_xyxy(pred_boxes: torch.Tensor, hw) -> np.ndarray:
    """Normalized cxcywh (Q, 4) -> absolute xyxy in an image of size hw."""
    h, w = hw
    return (box_cxcywh_to_xyxy(pred_boxes.float()) * pred_boxes.new_tensor([w, h, w, h])).cpu().numpy()


# --------------------------------------------------------------------------- subcommands

def cmd_predictions(args) -> str:
    cfg = load_config(args.config_file, args.opts)
    model = build_calibrated_model(cfg)
    name, metadata, dicts, inputs = dataset_images(cfg, args.dataset, args.num_images)
    rows, row_titles = [], []
    for record, item in zip(dicts, inputs):
        with torch.no_grad():
            instances = model([item])[0]["instances"]
        image = read_image(record["file_name"], format="RGB")
        rows.append([vis.draw_ground_truth(image, record, metadata),
                     vis.draw_detections(image, instances, metadata, args.score_threshold, args.max_detections)])
        row_titles.append(os.path.basename(record["file_name"]))
    title = (f"{cfg.MODEL.META_ARCHITECTURE} {vis.describe_precision(cfg)} on {name} "
             f"(score >= {args.score_threshold})")
    return vis.save_image_grid(rows, args.output, row_titles=row_titles,
                               col_titles=["ground truth", "predictions"], title=title)


def _scores(outputs, sigmoid: bool):
    """(Q,) best-class score per query of image 0: sigmoid (focal loss) or softmax with no-object."""
    logits = outputs["pred_logits"][0].float()
    probs = logits.sigmoid() if sigmoid else logits.softmax(-1)[:, :-1]
    return probs.max(-1).values


def cmd_attention(args) -> str:
    cfg = load_config(args.config_file, args.opts)
    teacher = build_float_teacher(cfg, args.teacher_config, args.teacher_weights)
    student = build_calibrated_model(cfg)
    _, metadata, _, inputs = dataset_images(cfg, args.dataset, 1, start=args.image_index)
    image = input_rgb(cfg, inputs[0])
    models = [("teacher fp32", teacher), (f"student {vis.describe_precision(cfg)}", student)]
    deformable = is_deformable(student)
    classes = metadata.get("thing_classes", None)

    runs = []
    for label, model in models:
        if deformable:
            with vis.capture_deformable_sampling(model, "decoder") as sampling:
                images, outputs = run_predict(model, inputs)
            runs.append((label, images, outputs, sampling))
        else:
            images, outputs = run_predict(model, inputs)
            runs.append((label, images, outputs, None))
    hw = tuple(runs[0][1].image_sizes[0])

    two_stage = is_two_stage(student)
    sigmoid = student.criterion.focal
    teacher_scores = _scores(runs[0][2], sigmoid)
    shared = teacher_scores.argsort(descending=True)[:args.num_queries].tolist()
    ncols = args.num_queries + (0 if deformable else 1)
    fig, axes = vis.new_figure(2, ncols, (3.0, 3.0))
    for row, (label, images, outputs, sampling) in enumerate(runs):
        scores = _scores(outputs, sigmoid)
        logits = outputs["pred_logits"][0]
        queries = scores.argsort(descending=True)[:args.num_queries].tolist() if two_stage else shared
        boxes = boxes_xyxy(outputs["pred_boxes"][0], hw)
        layers = sampling if deformable else outputs["states"].internals["dec_cross_attn"]
        if not -len(layers) <= args.layer < len(layers):
            raise SystemExit(f"error: --layer {args.layer} out of range for {len(layers)} decoder layers")
        layer_id = args.layer % len(layers)
        for col, q in enumerate(queries):
            cls = int(logits[q].float().argmax() if sigmoid else logits[q, :-1].float().argmax())
            cls_name = classes[cls] if classes and cls < len(classes) else str(cls)
            title = f"{label}\ndec layer {layer_id}, query {q}: {cls_name} {float(scores[q]):.2f}"
            if deformable:
                rec = sampling[layer_id]
                vis.draw_sampling_panel(axes[row, col], image, rec["locations"][0, q], rec["weights"][0, q],
                                        title, box_xyxy=boxes[q])
            else:
                out = outputs["states"].internals
                fhw = vis.feature_shape(out["dec_cross_attn"][layer_id].shape[-1], hw)
                heat = vis.detr_cross_attention_map(out, layer_id, q, fhw)
                vis.draw_heatmap_panel(axes[row, col], image, heat, title, box_xyxy=boxes[q])
        if not deformable:
            # Encoder self-attention of the feature cell under the centre of the teacher's best box.
            out = outputs["states"].internals
            enc_layers = out["enc_attn"]
            in_range = -len(enc_layers) <= args.layer < len(enc_layers)
            enc_id = args.layer % len(enc_layers) if in_range else len(enc_layers) - 1
            fhw = vis.feature_shape(enc_layers[enc_id].shape[-1], hw)
            tbox = boxes_xyxy(runs[0][2]["pred_boxes"][0], hw)[shared[0]]
            cx, cy = (tbox[0] + tbox[2]) / 2, (tbox[1] + tbox[3]) / 2
            fy = min(max(int(cy / hw[0] * fhw[0]), 0), fhw[0] - 1)
            fx = min(max(int(cx / hw[1] * fhw[1]), 0), fhw[1] - 1)
            heat = vis.detr_encoder_attention_map(out, enc_id, fy * fhw[1] + fx, fhw)
            vis.draw_heatmap_panel(axes[row, -1], image, heat, f"{label}\nenc layer {enc_id}, cell ({fy}, {fx})",
                                   marker_xy=((fx + 0.5) * hw[1] / fhw[1], (fy + 0.5) * hw[0] / fhw[0]))
    if deformable:
        handles, labels = axes[0, 0].get_legend_handles_labels()
        order = sorted(range(len(labels)), key=labels.__getitem__)
        axes[0, 0].legend([handles[i] for i in order], [labels[i] for i in order], loc="lower left",
                          fontsize=6, framealpha=0.7)
    kind = "sampling locations (dot area = attention weight)" if deformable else "attention (mean over heads)"
    fig.suptitle(f"{cfg.MODEL.META_ARCHITECTURE}: {kind}, image {args.image_index}", fontsize=10)
    return vis.save_figure(fig, args.output)


def cmd_histograms(args) -> str:
    cfg = load_config(args.config_file, args.opts)
    teacher = build_float_teacher(cfg, args.teacher_config, args.teacher_weights)
    student = build_calibrated_model(cfg)
    name, _, _, inputs = dataset_images(cfg, args.dataset, args.num_images)
    states = {"teacher": [], "student": []}
    for item in inputs:
        for key, model in (("teacher", teacher), ("student", student)):
            _, outputs = run_predict(model, [item])
            states[key].append(charts.query_hidden_states(outputs)[:, 0].float().cpu())  # (L, Q, C)
    teacher_hs = torch.stack(states["teacher"], 1)  # (L, N, Q, C)
    student_hs = torch.stack(states["student"], 1)
    # Two-stage teacher and student pick different proposals: their queries do not pair up.
    paired = not is_two_stage(student)
    stats = charts.query_histograms([t.numpy() for t in teacher_hs], [s.numpy() for s in student_hs], args.output,
                                 labels=("teacher fp32", f"student {vis.describe_precision(cfg)}"),
                                 paired=paired, bins=args.bins,
                                 title=f"{cfg.MODEL.META_ARCHITECTURE}: decoder query values, "
                                       f"{len(inputs)} images of {name}")
    for lid, row in enumerate(stats):
        diff = "n/a (unpaired queries)" if math.isnan(row["mean_abs_diff"]) else f"{row['mean_abs_diff']:.4f}"
        print(f"decoder layer {lid}: KL {row['kl']:.4f}  mean|diff| {diff}  "
              f"teacher {row['teacher_mean']:+.3f}+-{row['teacher_std']:.3f}  "
              f"student {row['student_mean']:+.3f}+-{row['student_std']:.3f}")
    return args.output


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, teacher: bool):
        p.add_argument("--config-file", required=True, metavar="FILE",
                       help="the model's config" + (" (the student)" if teacher else ""))
        p.add_argument("--output", required=True, metavar="PNG", help="the picture to write")
        p.add_argument("--dataset", help="dataset name (default: DATASETS.TEST[0])")
        if teacher:
            p.add_argument("--teacher-config", metavar="FILE",
                           help="float teacher config (default: MODEL.DISTILL.TEACHER_CONFIG)")
            p.add_argument("--teacher-weights", metavar="FILE",
                           help="float teacher checkpoint (default: MODEL.DISTILL.TEACHER_WEIGHTS)")
        p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")

    p = sub.add_parser("predictions", help="predictions beside ground truth, one row per image")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--score-threshold", type=float, default=0.3)
    p.add_argument("--max-detections", type=int, default=20, help="at most this many boxes per image")
    common(p, teacher=False)
    p.set_defaults(func=cmd_predictions)

    p = sub.add_parser("attention", help="teacher vs student attention maps for one image")
    p.add_argument("--image-index", type=int, default=0)
    p.add_argument("--layer", type=int, default=-1, help="decoder layer (Python index; DETR's encoder "
                   "column uses the same index, or the last encoder layer where it is out of range)")
    p.add_argument("--num-queries", type=int, default=3, help="top-scoring queries shown")
    common(p, teacher=True)
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("histograms", help="teacher vs student decoder query-value histograms")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--bins", type=int, default=80)
    common(p, teacher=True)
    p.set_defaults(func=cmd_histograms)
    return parser


def main(argv=None) -> str:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    for name in ("num_images", "num_queries"):
        if getattr(args, name, 1) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1")
    path = args.func(args)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    with user_errors_exit():  # a bad checkpoint, dataset or key: one line, exit 2
        main(sys.argv[1:])
