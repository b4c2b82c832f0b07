#!/usr/bin/env python
"""Where a quantized training step and an eval pass spend their time, per part.

    python benchmarks/profile_step.py [--arch detr|deformable] [--steps 3] [--output benchmarks/profile_detr.md]

Builds the float, LSQ W4A4A4 and AQ-DETR (auxiliary queries + distillation, teacher beside)
models of the shapes benchmark (benchmarks/run.py's configs, random float weights standing in
for the teacher), runs `--steps` training steps and eval passes under torch.profiler, and
sums the time of each part. The parts are labelled here, by wrapping the library's calls for
the length of the profile (the library itself carries no profiler labels):

    weight / activation / attention quantizers   QuantizerBase.forward, by the quantizer's place
    quantizer backward                           the LSQ autograd function's backward
    teacher forward                              the teacher's backbone and transformer layers
    distillation losses                          the rest of LayerDistiller.forward
    auxiliary-query losses (K-group matching)    aux_query_loss (its Hungarian matching inside)
    detection loss (matching)                    the criterion on the object queries

Prints a markdown table of each part's milliseconds per step and share of the step, and the
top operators by self time.
"""
import argparse
import functools
import os
import re
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model

import aqdetr_d2.modeling.set_prediction as set_prediction
from aqdetr_d2.data import DetrDatasetMapper
from aqdetr_d2.distill.distiller import LayerDistiller
from aqdetr_d2.engine import build_detr_optimizer
from aqdetr_d2.quant import QuantizerBase
from aqdetr_d2.quant.attention import QUANT_POINTS
from run import CONFIGS, _build, _cfg, _variants  # benchmarks/run.py, beside this script

TEACHER_LAYER = re.compile(r"(.*\.)?(encoder|decoder)\.layers\.\d+")
PARTS = ["weight quantizers", "activation quantizers", "attention quantizers", "quantizer backward",
         "teacher forward", "distillation losses", "auxiliary-query losses", "detection loss"]


def _role(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "weight_quantizer":
        return "weight quantizers"
    return "attention quantizers" if leaf in QUANT_POINTS else "activation quantizers"


def _label(fn, label):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapped


def label_parts(model):
    """Wrap the calls that make up each part in a profiler label; returns an undo function."""
    undo = []
    for name, module in model.named_modules():
        if isinstance(module, QuantizerBase) and module.enabled:
            module.forward = _label(module.forward, _role(name))
            undo.append(lambda m=module: m.__dict__.pop("forward", None))
    originals = {"aux": set_prediction.aux_query_loss, "distill": LayerDistiller.forward}
    set_prediction.aux_query_loss = _label(originals["aux"], "auxiliary-query losses")
    LayerDistiller.forward = _label(originals["distill"], "distillation losses")
    if model.distiller is not None:
        # The teacher's backbone and transformer layers, which teacher-forced distillation runs one by
        # one on the student's inputs (inside the distillation losses) and parallel mode through
        # teacher.predict; labelled per module so that the label never nests in itself.
        for name, module in model.distiller.teacher.named_modules():
            if name == "backbone" or TEACHER_LAYER.fullmatch(name):
                module.forward = _label(module.forward, "teacher forward")
                undo.append(lambda m=module: m.__dict__.pop("forward", None))
    criterion = model.criterion
    criterion.forward = _label(criterion.forward, "detection loss")
    undo.append(lambda: criterion.__dict__.pop("forward", None))

    def restore():
        set_prediction.aux_query_loss = originals["aux"]
        LayerDistiller.forward = originals["distill"]
        for fn in undo:
            fn()
    return restore


def part_times(prof, steps: int):
    """Milliseconds per step of each labelled part (inclusive) and of the LSQ backward."""
    totals = dict.fromkeys(PARTS, 0.0)
    for event in prof.key_averages():
        if event.key in totals:
            totals[event.key] += event.cpu_time_total / 1e3 / steps
        elif event.key.startswith("_LSQFunctionBackward"):
            totals["quantizer backward"] += event.cpu_time_total / 1e3 / steps
    return totals


def profile_model(name, path, opts, steps):
    cfg = _cfg(path, "cpu", opts)
    mapper = DetrDatasetMapper(cfg, is_train=True)
    batch = [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[: cfg.SOLVER.IMS_PER_BATCH]]
    image = [DetrDatasetMapper(cfg, is_train=False)(DatasetCatalog.get(cfg.DATASETS.TEST[0])[0])]
    model = _build(cfg)
    optimizer = build_detr_optimizer(cfg, model)
    model.train()

    def train_step():
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    train_step()  # initialises the quantizers, warms the allocator
    model.eval()
    with torch.no_grad():
        model(image)  # eval shapes differ from training ones: warm them too
    model.train()
    restore = label_parts(model)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as train_prof:
            for _ in range(steps):
                with record_function("step"):
                    train_step()
        model.eval()
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as eval_prof:
            for _ in range(steps):
                with record_function("step"):
                    model(image)
    finally:
        restore()
    rows = {}
    for kind, prof in (("train", train_prof), ("eval", eval_prof)):
        step = next(e.cpu_time_total for e in prof.key_averages() if e.key == "step") / 1e3 / steps
        top = sorted((e for e in prof.key_averages() if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
        rows[kind] = {"step_ms": step, "parts_ms": part_times(prof, steps),
                      "top_ops": [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in top[:8]]}
    return name, rows


def markdown(results, command: str) -> str:
    lines = [f"Command: `{command}` (CPU, {torch.get_num_threads()} threads, ms per step; parts are inclusive and "
             "may nest: the teacher's own quantizers do not exist, the student's run inside the losses' forward)", ""]
    for kind in ("train", "eval"):
        lines += [f"**{kind}**", "", "| model | step ms | " + " | ".join(PARTS) + " |",
                  "|---|---|" + "---|" * len(PARTS)]
        for name, rows in results:
            r = rows[kind]
            cells = [f"{r['parts_ms'][p]:.1f} ({r['parts_ms'][p] / r['step_ms']:.0%})" if r["parts_ms"][p] else "-"
                     for p in PARTS]
            lines.append(f"| {name} | {r['step_ms']:.1f} | " + " | ".join(cells) + " |")
        lines.append("")
        for name, rows in results:
            ops = ", ".join(f"{op[6:]} {ms:.1f}" for op, ms in rows[kind]["top_ops"])
            lines.append(f"- {name}, {kind}, top operators by self time (ms): {ops}")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("detr", "deformable"), default="detr")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output", help="markdown file to write")
    args = parser.parse_args()
    configs = CONFIGS["DETR" if args.arch == "detr" else "Deformable-DETR"]
    with tempfile.TemporaryDirectory() as workdir:
        teacher = os.path.join(workdir, "float.pth")
        torch.manual_seed(0)
        torch.save({"model": build_model(_cfg(configs[0], "cpu")).state_dict()}, teacher)
        results = [profile_model(name, path, opts, args.steps) for name, path, opts in _variants(configs, teacher)]
    table = markdown(results, "python benchmarks/profile_step.py " + " ".join(sys.argv[1:]))
    if args.output:
        with open(args.output, "w") as f:
            f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
