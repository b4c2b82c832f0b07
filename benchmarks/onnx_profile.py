#!/usr/bin/env python
"""Where ONNX Runtime spends its time: node time per operator type, float against W4A4A4.

    python benchmarks/onnx_profile.py --model "DETR (shapes)" [--runs 20] [--output benchmarks/onnx_profile_detr_shapes.md]

The models and their calibration are those of `benchmarks/onnx_runtime.py` (random weights; the
time does not depend on their values). Each file runs in a session of onnxruntime's own profiler
(`enable_profiling`), after onnxruntime's graph optimisations, so the operator types are the
fused ones that really ran (QLinearConv, MatMulIntegerToFloat, ...). Node times are summed per
type over `--runs` runs after two warm-ups; shares are of the summed node time.
"""
import argparse
import collections
import json
import os
import shlex
import sys
import tempfile

import torch

from aqdetr_d2.deploy import export_onnx
from aqdetr_d2.deploy.runtime import ort_session
from onnx_runtime import MODELS, _model  # benchmarks/, beside this script


def op_times(path: str, image, runs: int, workdir: str) -> collections.Counter:
    """Microseconds per operator type, summed over `runs` runs of `image`."""
    session = ort_session(path, profile_prefix=os.path.join(workdir, os.path.basename(path)))
    for _ in range(2 + runs):
        session.run(None, {"image": image})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    # The first two runs' nodes are the warm-up: each run executes the same nodes once.
    per_run = len(nodes) // (2 + runs)
    times = collections.Counter()
    for e in nodes[2 * per_run:]:
        times[e["args"]["op_name"]] += e["dur"]
    return times


def markdown(name: str, profiles: dict, runs: int, top: int) -> str:
    lines = [f"ONNX Runtime node time per operator type, {name}, batch 1, mean of {runs} runs "
             f"(`{shlex.join(['python', 'benchmarks/onnx_profile.py', *sys.argv[1:]])}`)", ""]
    for fmt, times in profiles.items():
        total = sum(times.values())
        lines += [f"**{fmt}**: {total / runs / 1e3:.1f} ms of node time per run", "",
                  "| operator | ms per run | share |", "|---|---|---|"]
        lines += [f"| {op} | {us / runs / 1e3:.2f} | {us / total:.0%} |" for op, us in times.most_common(top)]
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="DETR (shapes)", choices=list(MODELS))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--top", type=int, default=12, help="operator types listed per file")
    parser.add_argument("--output", help="also write the tables to this markdown file")
    args = parser.parse_args()
    float_config, quant_config, size = MODELS[args.model]
    image = torch.rand(1, 3, *size) * 255
    profiles = {}
    with tempfile.TemporaryDirectory() as workdir:
        for fmt, config in (("float", float_config), ("W4A4A4", quant_config)):
            torch.manual_seed(0)
            path = os.path.join(workdir, f"{fmt}.onnx")
            export_onnx(_model(config, size), path, image)
            profiles[fmt] = op_times(path, image.numpy(), args.runs, workdir)
    table = markdown(args.model, profiles, args.runs, args.top)
    if args.output:
        with open(args.output, "w") as f:
            f.write(table)
    print(table)


if __name__ == "__main__":
    main()
