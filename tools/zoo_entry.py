#!/usr/bin/env python
"""Make a model-zoo entry: docs/models/<name>/ with config.yaml, model.pth and metrics.json.

    python tools/zoo_entry.py --name detr_shapes_w4a4_aq --config-file configs/shapes/picked/detr_w4a4_aq.yaml \\
        --made-by "python tools/quickstart.py --precision w4a4 ..." MODEL.WEIGHTS output/.../model_final.pth

From a quantization-aware checkpoint (MODEL.WEIGHTS) it writes
- model.pth: the packed integer export (tools/export_quantized.py);
- config.yaml: the full config, MODEL.WEIGHTS pointing at model.pth, so that
  `train_net.py --eval-only --config-file docs/models/<name>/config.yaml MODEL.WEIGHTS docs/models/<name>/model.pth`
  works as written; the tool runs exactly that command and reads its AP;
- metrics.json: AP, AP50, AP75 of that command, the command, the same with
  MODEL.QUANT.INTEGER_EVAL ("integer": the ONNX export's arithmetic in PyTorch), `--made-by` (how
  the checkpoint was trained), the file size, and for the quantized ONNX export its AP in onnxruntime
  (tools/eval_onnx.py, same test set), its latency and file size against the float one
  (tools/export_onnx.py; the float export from the same checkpoint's float weights), at batch 1
  on a test-sized image, this machine's threads.
README's model-zoo table is generated from the metrics.json files (tools/results_tables.py).

    python tools/zoo_entry.py --name detr_shapes_w4a4_aux --refresh-onnx-ap

measures an existing entry's onnxruntime AP and its integer-forms AP again, from its committed
model.pth and config.yaml (after a change to the ONNX export), and updates only those parts of its metrics.json; the
latencies and file sizes stay as first measured (the QAT checkpoint behind the float export
need not exist any more).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

from aqdetr_d2.config import load_config
from aqdetr_d2.deploy.runtime import session_latencies
from aqdetr_d2.errors import UserInputError, user_errors_exit
from aqdetr_d2.experiments.runs import copypaste_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB = 2**20


def run(*args) -> str:
    """Run a project script with this interpreter; its output, or a one-line error naming it."""
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserInputError(f"{' '.join(args[:1])} failed: {tail}")
    return result.stdout + result.stderr


def copypaste_ap(output: str, what: str):
    """(AP, AP50, AP75) of an evaluation's output (Detectron2's `copypaste:` lines)."""
    metrics = copypaste_metrics(output.splitlines())
    if metrics is None:
        raise UserInputError(f"{what}: the evaluation printed no AP")
    return metrics["AP"], metrics["AP50"], metrics["AP75"]


def onnx_ap(config_path: str, onnx_path: str):
    """(AP, AP50, AP75) in onnxruntime of the entry `config_path` names, exported to `onnx_path`."""
    run("tools/export_onnx.py", "--config-file", config_path, "--output", onnx_path)
    return copypaste_ap(run("tools/eval_onnx.py", "--config-file", config_path, "--onnx", onnx_path), onnx_path)


def entry_eval_command(rel: str) -> list:
    """The `train_net.py --eval-only` arguments of the entry in folder `rel` (relative to the
    project root), as its metrics.json records them."""
    return ["projects/AQDETR/train_net.py", "--eval-only", "--config-file", f"{rel}/config.yaml",
            "MODEL.WEIGHTS", f"{rel}/model.pth"]


def integer_ap(eval_command) -> dict:
    """AP, AP50, AP75 and the command of `eval_command` (train_net.py --eval-only) with
    MODEL.QUANT.INTEGER_EVAL: the integer forms that the ONNX export writes, in PyTorch."""
    command = [*eval_command, "MODEL.QUANT.INTEGER_EVAL", "True"]
    ap = copypaste_ap(run(*command), "--eval-only with MODEL.QUANT.INTEGER_EVAL")
    return {"AP": ap[0], "AP50": ap[1], "AP75": ap[2], "eval_command": "python " + " ".join(command)}


def refresh_onnx_ap(entry: str):
    """Measure the committed entry in `entry` in onnxruntime, and its integer forms in PyTorch,
    again; rewrite those parts of its metrics.json."""
    path = os.path.join(entry, "metrics.json")
    if not os.path.isfile(path):
        raise UserInputError(f"{entry} is not a zoo entry (no metrics.json): make it first, without --refresh-onnx-ap")
    with open(path) as f:
        metrics = json.load(f)
    rel = os.path.relpath(entry, ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        ap = onnx_ap(f"{rel}/config.yaml", os.path.join(tmp, "quantized.onnx"))
    metrics["onnx"].update(AP=ap[0], AP50=ap[1], AP75=ap[2])
    metrics["integer"] = integer_ap(entry_eval_command(rel))
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics, indent=2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="folder name under docs/models (arch, precision, recipe)")
    parser.add_argument("--config-file", metavar="FILE", help="the QAT checkpoint's config (a new entry)")
    parser.add_argument("--made-by", help="the command that trained MODEL.WEIGHTS (a new entry)")
    parser.add_argument("--refresh-onnx-ap", action="store_true",
                        help="measure an existing entry's onnxruntime AP again from its model.pth; nothing else changes")
    parser.add_argument("--root", default=os.path.join(ROOT, "docs", "models"), help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides, MODEL.WEIGHTS among them")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[a-z0-9_]+", args.name):
        raise UserInputError(f"--name {args.name!r}: use lower-case letters, digits and underscores")
    if args.refresh_onnx_ap:
        return refresh_onnx_ap(os.path.join(args.root, args.name))
    if not (args.config_file and args.made_by):
        raise UserInputError("a new entry needs --config-file and --made-by (or --refresh-onnx-ap for an existing one)")
    cfg = load_config(args.config_file, args.opts)
    if not cfg.MODEL.QUANT.ENABLED or not cfg.MODEL.WEIGHTS:
        raise UserInputError("a zoo entry is a quantized model: pass its quantized config and MODEL.WEIGHTS")
    entry = os.path.join(args.root, args.name)
    os.makedirs(entry, exist_ok=True)
    rel = os.path.relpath(entry, ROOT)
    model_path, config_path = f"{rel}/model.pth", f"{rel}/config.yaml"

    # The teacher and the auxiliary queries are for training only: an entry needs neither, and its
    # config names no teacher file (whose path would be this machine's).
    training_only = ["MODEL.DISTILL.ENABLED", "False", "MODEL.AUX_QUERIES.ENABLED", "False",
                     "MODEL.DISTILL.TEACHER_CONFIG", "", "MODEL.DISTILL.TEACHER_WEIGHTS", ""]
    run("tools/export_quantized.py", "--config-file", args.config_file, "--output", model_path, *args.opts,
        *training_only)
    cfg.defrost()
    cfg.MODEL.WEIGHTS = model_path
    cfg.OUTPUT_DIR = f"output/models/{args.name}"
    cfg.merge_from_list(training_only)
    with open(config_path, "w") as f:
        f.write(cfg.dump())
    eval_command = entry_eval_command(rel)
    ap, ap50, ap75 = copypaste_ap(run(*eval_command), config_path)

    size = (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST * 4 // 3)
    image = (torch.rand(1, 3, *size) * 255).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        quantized, float_onnx = os.path.join(tmp, "quantized.onnx"), os.path.join(tmp, "float.onnx")
        ort_ap = onnx_ap(config_path, quantized)
        run("tools/export_onnx.py", "--config-file", args.config_file, "--output", float_onnx, "--float", *args.opts,
            *training_only)
        float_latency, latency = session_latencies([float_onnx, quantized], image, repeats=30)
        onnx_metrics = {"AP": ort_ap[0], "AP50": ort_ap[1], "AP75": ort_ap[2], "image": list(size),
                        "threads": os.cpu_count(), "float_latency_s": float_latency, "latency_s": latency,
                        "float_mb": os.path.getsize(float_onnx) / MB, "mb": os.path.getsize(quantized) / MB}
    metrics = {"name": args.name, "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
               "precision": f"W{cfg.MODEL.QUANT.WEIGHT_BITS}A{cfg.MODEL.QUANT.ACT_BITS}A{cfg.MODEL.QUANT.ATTN_BITS}",
               "dataset": cfg.DATASETS.TEST[0], "AP": ap, "AP50": ap50, "AP75": ap75,
               "eval_command": "python " + " ".join(eval_command), "integer": integer_ap(eval_command),
               "made_by": args.made_by,
               "model_mb": os.path.getsize(model_path) / MB, "onnx": onnx_metrics}
    with open(os.path.join(entry, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    with user_errors_exit():  # a bad checkpoint, config or name: one line, exit 2
        main()
