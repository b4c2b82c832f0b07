#!/usr/bin/env python
"""A run's evaluation curve from its Detectron2 metrics.json: a picture, a table, and whether it
has converged (AP gained less than --tolerance over the last quarter of the schedule).

    python tools/training_curve.py output/detr_teacher18k/teacher/metrics.json \\
        --output docs/quickstart/detr_teacher_curve.png [--tolerance 0.5]

Prints one line per evaluation (iteration, AP, AP50, AP75, learning rate) and the verdict; exits 1
when the run has not converged, so that a script can train on.
"""
import argparse
import json
import sys

from aqdetr_d2.utils.visualization import new_figure, save_figure


def read_curve(path: str):
    """[(iteration, {metric: value}, lr)] of every COCO evaluation in a metrics.json, oldest first."""
    evaluations, lr = [], {}
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if "lr" in record:
                lr[record["iteration"]] = record["lr"]
            if "bbox/AP" in record:
                metrics = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("bbox/")}
                evaluations.append((record["iteration"], metrics))
    return [(it, m, lr.get(it, lr.get(max((i for i in lr if i <= it), default=-1)))) for it, m in evaluations]


def last_quarter_gain(curve, max_iter: int) -> float:
    """AP at the end minus AP at the last evaluation at or before 3/4 of the schedule."""
    start = max((c for c in curve if c[0] < 0.75 * max_iter), key=lambda c: c[0])
    return curve[-1][1]["AP"] - start[1]["AP"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", help="a run's metrics.json")
    parser.add_argument("--output", help="PNG of AP, AP50 and AP75 against iterations")
    parser.add_argument("--max-iter", type=int, help="the schedule's length (default: the last evaluation)")
    parser.add_argument("--tolerance", type=float, default=0.5, help="largest AP gain of a converged last quarter")
    args = parser.parse_args(argv)
    curve = read_curve(args.metrics)
    if len(curve) < 2:
        raise SystemExit(f"{args.metrics} holds {len(curve)} evaluation(s); a curve needs two")
    max_iter = args.max_iter or curve[-1][0] + 1
    print("| iteration | AP | AP50 | AP75 | lr |\n|---|---|---|---|---|")
    for it, m, lr in curve:
        print(f"| {it + 1} | {m['AP']:.1f} | {m['AP50']:.1f} | {m['AP75']:.1f} | {lr:.2g} |")
    finished = curve[-1][0] + 1 >= max_iter
    gain = last_quarter_gain(curve, max_iter) if finished else float("nan")
    converged = finished and gain < args.tolerance
    if not finished:
        print(f"not finished: the last evaluation is at iteration {curve[-1][0] + 1} of {max_iter}")
    else:
        print(f"AP gained {gain:+.2f} over the last quarter (iterations {0.75 * max_iter:.0f}-{max_iter}): "
              + ("converged" if converged else f"not converged (tolerance {args.tolerance})"))
    if args.output:
        fig, axes = new_figure(1, 1, (6.0, 3.5))
        ax = axes[0][0]
        for metric in ("AP", "AP50", "AP75"):
            ax.plot([c[0] + 1 for c in curve], [c[1][metric] for c in curve], marker="o", label=metric)
        ax.axvspan(0.75 * max_iter, max_iter, color="0.9", label="last quarter")
        ax.set_xlabel("iteration")
        ax.set_ylabel("COCO AP (%)")
        ax.legend(loc="lower right")
        print(f"wrote {save_figure(fig, args.output)}")
    return 0 if converged else 1


if __name__ == "__main__":
    sys.exit(main())
