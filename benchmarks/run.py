#!/usr/bin/env python
"""Speed and size benchmarks of AQ-DETR, every figure measured in this one process.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--r50] [--onnx] [--output benchmarks/results.json]

For both shapes architectures: training step time and eval latency of the float model, LSQ
W4A4A4 and W4A4A4 + auxiliary queries + distillation (ratios against float), the packed
export's size against the float checkpoint, and deformable attention against its reference; with --r50
the same three variants of DETR-R50 and Deformable-DETR-R50 at 800x1333, batch 1, random weights
(benchmarks/r50_step.py); with --onnx also onnxruntime latency and file size
of the float and W4A4A4 ONNX exports, for the shapes models and the R50 models at 800x1333
(benchmarks/onnx_runtime.py).
Writes JSON and a markdown table next to it and prints the table. Compare figures only
within one run: the machines are shared, so absolute times drift but ratios hold.
"""
import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile

import torch

from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

from aqdetr_d2.checkpoint import AQDETRCheckpointer
from aqdetr_d2.config import load_config
from aqdetr_d2.data import DetrDatasetMapper
from aqdetr_d2.distill import build_distiller
from aqdetr_d2.engine import build_detr_optimizer, initialize_quantizers
from aqdetr_d2.layers.ms_deform_attn import ms_deform_attn
from aqdetr_d2.layers.ms_deform_attn_reference import ms_deform_attn_reference
from aqdetr_d2.quant import export_quantized, fused
from goals import goals_markdown  # benchmarks/, beside this script
from onnx_runtime import bench_onnx, onnx_markdown
from r50_step import R50_CONFIGS, bench_r50
from timing import Subject, add_ratios, timed, train_and_eval_times

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Architecture -> (float, LSQ W4A4A4, AQ-DETR W4A4A4) configs.
CONFIGS = {
    "DETR": ("configs/shapes/detr_fp32.yaml", "configs/shapes/detr_lsq_w4a4.yaml", "configs/shapes/aqdetr_w4a4.yaml"),
    "Deformable-DETR": ("configs/shapes/deformable_detr_fp32.yaml", "configs/shapes/deformable_detr_lsq_w4a4.yaml",
                        "configs/shapes/aq_deformable_detr_w4a4.yaml"),
}


def _cfg(path, device, opts=()):
    return load_config(os.path.join(ROOT, path), ["MODEL.DEVICE", device, *opts])


def _variants(configs, teacher_weights):
    """(name, config, options) of the float model and the quantized ones compared with it."""
    float_cfg, lsq_cfg, aq_cfg = configs
    return [
        ("float", float_cfg, []),
        ("LSQ W4A4A4", lsq_cfg, ["MODEL.WEIGHTS", teacher_weights]),
        ("W4A4A4 + aux queries + distillation", aq_cfg,
         ["MODEL.WEIGHTS", teacher_weights, "MODEL.DISTILL.TEACHER_WEIGHTS", teacher_weights,
          "MODEL.DISTILL.TEACHER_CONFIG", os.path.join(ROOT, float_cfg)]),
    ]


def _build(cfg):
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        AQDETRCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    if cfg.MODEL.DISTILL.ENABLED:
        model.distiller = build_distiller(cfg)
    return model


def _subject(path, device, opts=(), context=contextlib.nullcontext) -> Subject:
    """The model of config `path` with its optimizer, a training batch and a one-image eval input."""
    cfg = _cfg(path, device, opts)
    mapper = DetrDatasetMapper(cfg, is_train=True)
    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    batch = [mapper(d) for d in dicts[: cfg.SOLVER.IMS_PER_BATCH]]
    model = _build(cfg)
    test_mapper = DetrDatasetMapper(cfg, is_train=False)
    image = [test_mapper(DatasetCatalog.get(cfg.DATASETS.TEST[0])[0])]
    return Subject(model, build_detr_optimizer(cfg, model), batch, image, context)


def bench_deform_attn(device, quick):
    """Deformable-attention function against the naive reference on the shapes model's sizes."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 16), (8, 8), (4, 4)]
    batch, heads, head_dim, queries, points = (2, 8, 16, 30, 4)
    length = sum(h * w for h, w in shapes)
    value = torch.randn(batch, length, heads, head_dim, generator=gen).to(device)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=gen).to(device)
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=gen).softmax(-1).to(device)
    spatial = torch.as_tensor(shapes, device=device)
    fast = timed(lambda: ms_deform_attn(value, spatial, locations, weights), 20, device)
    naive = timed(lambda: ms_deform_attn_reference(value, spatial, locations, weights), 1 if quick else 3, device)
    return {"shapes": shapes, "batch": batch, "queries": queries, "heads": heads, "points": points,
            "grid_sample_s": fast, "naive_loop_s": naive, "speedup": naive / fast}


def bench_export(lsq_config, device, teacher_weights, workdir):
    """Packed W4A4A4 export of the model against the float checkpoint, both on disk."""
    cfg = _cfg(lsq_config, device, ["MODEL.WEIGHTS", teacher_weights])
    model = _build(cfg)
    initialize_quantizers(cfg, model)
    out = os.path.join(workdir, "export.pth")
    torch.save(export_quantized(model), out)
    return {"float_checkpoint_bytes": os.path.getsize(teacher_weights), "export_bytes": os.path.getsize(out),
            "ratio": os.path.getsize(out) / os.path.getsize(teacher_weights)}


def bench_architecture(arch, configs, device, repeats, workdir):
    """Float, LSQ W4A4A4 and full AQ-DETR of one architecture; ratios against float."""
    teacher_weights = os.path.join(workdir, f"{arch}_float.pth")
    cfg = _cfg(configs[0], device)
    torch.manual_seed(0)
    # Random float weights stand in for the teacher: speed and size do not depend on them.
    torch.save({"model": build_model(cfg).state_dict()}, teacher_weights)
    variants = [(f"{arch} {name}", path, opts, contextlib.nullcontext)
                for name, path, opts in _variants(configs, teacher_weights)]
    # What the fused quantizer kernels save, in the same run.
    variants.append((f"{arch} LSQ W4A4A4, eager fake-quant ops", configs[1], ["MODEL.WEIGHTS", teacher_weights],
                     fused.eager_ops))
    # What training on the export's int32 conv bias costs (weight codes and bias steps every step).
    variants.append((f"{arch} LSQ W4A4A4, MODEL.QUANT.INTEGER_BIAS", configs[1],
                     ["MODEL.WEIGHTS", teacher_weights, "MODEL.QUANT.INTEGER_BIAS", "True"], contextlib.nullcontext))
    subjects = [_subject(path, device, opts, context) for _, path, opts, context in variants]
    times = train_and_eval_times(subjects, device, repeats, repeats * 4)
    rows = [{"model": name, "config": path, "options": list(opts), **t}
            for (name, path, opts, _), t in zip(variants, times)]
    return add_ratios(rows), bench_export(configs[1], device, teacher_weights, workdir)


def markdown(results):
    header = [f"Device: {results['device']} ({results['machine']}), torch {results['torch']}, "
             f"threads {results['threads']}, GLIBC_TUNABLES `{results.get('glibc_tunables') or 'unset'}`. "
             f"Command: `{results['command']}`", ""]
    if "onnx" in results:
        header += [onnx_markdown(results["onnx"]), ""]
    if not results["models"]:
        return "\n".join(header)
    lines = header + ["| model | batch | train s/step | train vs float | eval s/img | eval vs float | peak train MB | params |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results["models"]:
        peak = "n/a (CPU)" if r["peak_train_memory_mb"] is None else f"{r['peak_train_memory_mb']:.0f}"
        lines.append(f"| {r['model']} | {r['batch']} | {r['train_step_s']:.3f} | {r['train_ratio']:.2f}x | "
                     f"{r['eval_latency_s']:.4f} | {r['eval_ratio']:.2f}x | {peak} | {r['parameters'] / 1e6:.2f}M |")
    lines += ["", "| W4A4A4 export | float checkpoint | packed export | ratio |", "|---|---|---|---|"]
    for arch, e in results["export"].items():
        lines.append(f"| {arch} | {e['float_checkpoint_bytes'] / 2**20:.2f} MB | {e['export_bytes'] / 2**20:.2f} MB | "
                     f"{e['ratio']:.3f} |")
    d = results["deform_attn"]
    lines += ["", "| deformable attention | grid_sample | explicit bilinear reference | speed-up |", "|---|---|---|---|",
              f"| B={d['batch']}, Q={d['queries']}, levels [{', '.join(f'({h}, {w})' for h, w in d['shapes'])}] | {d['grid_sample_s'] * 1e3:.2f} ms | "
              f"{d['naive_loop_s'] * 1e3:.1f} ms | {d['speedup']:.0f}x |"]
    goals = goals_markdown(results)
    if goals:
        lines += ["", "Issue 27's goals against this run (why the missed ones are missed: docs/benchmarks.md):", "",
                  goals]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (under 5 minutes on 2 CPU cores)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--r50", action="store_true", help="add the R50 models' train step and eval at 800x1333")
    parser.add_argument("--onnx", action="store_true", help="add onnxruntime latency / size of the ONNX exports")
    parser.add_argument("--onnx-only", action="store_true", help="measure only the ONNX exports")
    parser.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results.json"))
    parser.add_argument("--render", metavar="JSON", help="measure nothing: rewrite JSON's markdown (.md beside it)")
    args = parser.parse_args()
    if args.render:
        if not os.path.isfile(args.render):
            sys.exit(f"--render {args.render}: no such results file; write one with benchmarks/run.py --output")
        with open(args.render) as f:
            write_markdown(json.load(f), args.render)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    torch.manual_seed(0)
    repeats = 3 if args.quick else 10
    results = {"device": args.device, "machine": platform.processor() or platform.machine(),
               "torch": torch.__version__, "threads": torch.get_num_threads(),
               # glibc malloc settings change CPU step times a lot (docs/training.md, "Train and evaluate").
               "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
               "command": "python benchmarks/run.py " + " ".join(sys.argv[1:]),
               "models": [], "export": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for arch, configs in ({} if args.onnx_only else CONFIGS).items():
            rows, export = bench_architecture(arch, configs, args.device, repeats, workdir)
            results["models"] += rows
            results["export"][arch] = export
        for arch in R50_CONFIGS if args.r50 else ():
            results["models"] += bench_r50(arch, args.device, 1 if args.quick else 3, workdir)
        if args.onnx or args.onnx_only:
            results["onnx"] = bench_onnx(workdir, repeats)
            results["onnx_threads"] = os.cpu_count()
    if not args.onnx_only:
        results["deform_attn"] = bench_deform_attn(args.device, args.quick)
    if args.device == "cuda":
        results["machine"] = torch.cuda.get_device_name()
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    write_markdown(results, args.output)


def write_markdown(results: dict, json_path: str):
    """Print the tables of `results` and write them beside `json_path` (.md)."""
    table = markdown(results)
    with open(os.path.splitext(json_path)[0] + ".md", "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
