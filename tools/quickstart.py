#!/usr/bin/env python
"""The AQ-DETR ablation in miniature on the built-in shapes dataset, on a CPU.

    python tools/quickstart.py [--arch detr|deformable] [--precision w4a4] [--seeds 1 2] [--variants ...]

1. the full-precision teacher: the committed checkpoint `docs/quickstart/<arch>_teacher.pth`
   if present (made by `--train-teacher`, its log beside it), else trained here;
2. from the teacher, once per seed, the `--variants`: by default the control (the teacher
   fine-tuned unquantized), LSQ (no auxiliary queries, no distillation) and AQ-DETR; also
   LSQ + auxiliary queries and LSQ + distillation. Each runs the config tools/sweep.py picked
   for it on shapes_holdout (`--configs`), else the student config for `--iters`. `--jobs`
   fine-tunes run at once;
3. every run evaluated by Detectron2's COCO evaluator on `shapes_val` (1000 images), beside
   the teacher itself, post-training quantization of it (min-max) and the calibrated start
   (the students' quantizers initialised as QAT starts), none of them trained;
   `results.md` (mean over seeds, each seed's AP), `results.json` and `ablation.png` written
   to `--output`, the table printed.

Every stage is a `projects/AQDETR/train_net.py` run (Detectron2's ETA lines show its progress); the
progress lines (a run started, its speed known, a run done) end with the whole run's ETA.
"""
import argparse
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from aqdetr_d2.config import load_config
from aqdetr_d2.experiments.runs import (ROOT, evaluated_metrics, final_metrics, finished, logged_evaluation,
                                        record_minutes, run_logged, run_numerics, share_cores, stage, train_net)
from aqdetr_d2.experiments.ablation_table import (control_rows, interpolated_name, mean_over_seeds, previous_minutes,
                                                   with_previous_rows, write_results)
from aqdetr_d2.experiments.committed_runs import committed_run
from aqdetr_d2.experiments.progress import RunPlan
from aqdetr_d2.experiments.shapes_ablation import (ARCHS, BACKBONE_OPTS, DEFAULT_VARIANTS, PRECISIONS,
                                                   TEACHER_CURVE_OPTS, VARIANTS, checkpoint_opts, fine_tune_opts,
                                                   slowest_first, teacher_schedule, variant_opts)

INTERPOLATE = os.path.join(ROOT, "tools", "interpolate_weights.py")
# Where tools/sweep.py writes the settings it picked on shapes_holdout (relative to the root).
PICKED_CONFIGS = os.path.join("configs", "shapes", "picked")


def check_teacher(path: str):
    """Refuse a corrupt teacher before an hour of training depends on it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (any unreadable file is the same problem to the user)
        raise SystemExit(f"teacher checkpoint {path} cannot be read ({e}); delete it to retrain with "
                         "`python tools/quickstart.py --train-teacher`") from e
    if "model" not in state or not any(k.startswith("backbone.") for k in state["model"]):
        raise SystemExit(f"teacher checkpoint {path} is not a detector checkpoint; delete it to retrain")


def write_teacher_config(arch: str, opts, path: str) -> str:
    """The teacher's full config as one YAML file: train_net trains it, the distiller rebuilds it."""
    cfg = load_config(os.path.join(ROOT, ARCHS[arch]["teacher"]), opts, freeze=False)
    with open(path, "w") as f:
        f.write(cfg.dump())
    return path


def check_dataset_dir():
    root = os.getenv("DETECTRON2_DATASETS", "datasets")
    os.makedirs(root, exist_ok=True)
    if not os.access(root, os.W_OK) and not os.path.isdir(os.path.join(root, "shapes")):
        raise SystemExit(f"dataset directory {root} is not writable: set DETECTRON2_DATASETS to a writable folder")


def size_and_ops(config: str, opts):
    """Q-DETR-accounting model size (MB) and GOPs of the student at one 128x128 image."""
    from detectron2.modeling import build_model

    from aqdetr_d2.modeling import meta_arch_class
    from aqdetr_d2.quant.report import model_report

    cfg = load_config(os.path.join(ROOT, config), [*opts, "MODEL.DEVICE", "cpu", "MODEL.DISTILL.ENABLED", "False"])
    model = build_model(cfg).eval()
    image = torch.randint(0, 256, (3, 128, 128), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    report = model_report(model, lambda: [{"image": image, "height": 128, "width": 128}],
                          meta_arch_class(cfg).part_patterns())
    total = report.as_dict()["total"]
    return total["size_mb"], total["ops"] / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), default="detr")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="w4a4",
                        help="student bits: w4a4 = W4A4A4 (weights, activations, attention), w4a4a8 = 8-bit attention")
    parser.add_argument("--iters", type=int, default=400, help="fine-tuning iterations per variant")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="one fine-tune per variant per seed")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS,
                        help="ablation rows to train (default: fp lsq aq; 'fp' is the control, the teacher "
                             "fine-tuned unquantized on the same schedule)")
    parser.add_argument("--output", default=os.path.join(ROOT, "output", "quickstart"))
    parser.add_argument("--resume", action="store_true",
                        help="keep the finished runs (and evaluations) already in --output and resume unfinished "
                             "ones, a --train-teacher teacher included, from their last checkpoint (e.g. to add "
                             "seeds to an earlier table, or to finish an interrupted run)")
    parser.add_argument("--train-teacher", action="store_true", help="train the teacher even if one is committed")
    parser.add_argument("--teacher-iters", type=int, default=None,
                        help="override the teacher's iterations (DETR 18000, Deformable-DETR 3500; the drops scale with them)")
    parser.add_argument("--teacher-only", action="store_true", help="stop once the teacher is trained and checked")
    parser.add_argument("--interpolate", type=float, default=None, metavar="ALPHA",
                        help="also evaluate each fine-tune interpolated with the calibrated model it started from, "
                             "(1 - ALPHA) start + ALPHA fine-tuned (tools/interpolate_weights.py), as extra rows "
                             "(none for ALPHA 1, the fine-tune itself)")
    parser.add_argument("--interpolate-from", metavar="SWEEP_JSON",
                        help="as --interpolate, with the alpha tools/sweep.py --alphas picked for each variant")
    parser.add_argument("--configs", metavar="DIR", default=PICKED_CONFIGS,
                        help="fine-tune each variant with the config tools/sweep.py picked for it in DIR "
                             "(<arch>_<precision>_<variant>.yaml), where there is one (default: %(default)s)")
    parser.add_argument("--control-from", metavar="RESULTS_JSON",
                        help="take the control rows (fp) from an earlier quickstart's results.json of the same "
                             "architecture, seeds and configs instead of training them: the control runs "
                             "unquantized, so it does not depend on --precision")
    parser.add_argument("--runs-from", metavar="DIR",
                        help="take each fine-tune that tools/collect_runs.py committed to DIR finished (its config "
                             "and log) instead of training it, e.g. to finish a grid after its machine was lost; "
                             "not with interpolated rows, which need the checkpoints")
    parser.add_argument("--jobs", type=int, default=2,
                        help="fine-tunes run at once, each with 1/jobs of the cores (OMP_NUM_THREADS, unless "
                             "set); the committed tables were made with the default, on 2 cores")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides for every run")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.control_from and "fp" in args.variants:
        parser.error("--control-from takes the control (fp) from another run: leave fp out of --variants")
    # Every run of the table, evaluations included, on the same threads: they set the last bits.
    share_cores(args.jobs)
    if args.interpolate is not None and args.interpolate_from:
        parser.error("--interpolate and --interpolate-from exclude each other")
    if args.interpolate is not None:
        from aqdetr_d2.engine.interpolation import check_alpha

        try:
            check_alpha(args.interpolate)
        except ValueError as e:
            parser.error(f"--interpolate: {e}")

    from aqdetr_d2.utils.results import INTERP

    check_dataset_dir()
    os.makedirs(args.output, exist_ok=True)
    arch = ARCHS[args.arch]
    committed = os.path.join(ROOT, "docs", "quickstart", f"{args.arch}_teacher")
    teacher, teacher_cfg = committed + ".pth", committed + ".yaml"
    if args.train_teacher or not os.path.exists(teacher):
        schedule = teacher_schedule(arch, args.teacher_iters)
        teacher_cfg = write_teacher_config(args.arch, BACKBONE_OPTS + schedule + args.opts,
                                           os.path.join(args.output, "teacher_config.yaml"))
        teacher_dir = os.path.join(args.output, "teacher")
        iters = int(schedule[schedule.index("SOLVER.MAX_ITER") + 1])
        if args.resume and finished(teacher_dir, iters):
            stage(f"kept the finished teacher in {teacher_dir}")
        else:
            stage(f"training the full-precision teacher ({arch['teacher']})")
            train_net(os.path.relpath(teacher_cfg, ROOT), teacher_dir,
                      (["--resume"] if args.resume else []) + TEACHER_CURVE_OPTS, os.path.join(args.output, "teacher.log"))
        teacher = os.path.join(teacher_dir, "model_final.pth")
    check_teacher(teacher)
    stage(f"teacher: {teacher}")
    if args.teacher_only:
        return

    student_cfg = arch["student"].format(p=args.precision)
    bits = PRECISIONS[args.precision]
    common = fine_tune_opts(teacher, teacher_cfg, args.iters) + args.opts
    untrained = ["MODEL.AUX_QUERIES.ENABLED", "False", "MODEL.DISTILL.ENABLED", "False"]
    evaluations = [
        ("teacher", "full precision (teacher)", "teacher_eval", os.path.relpath(teacher_cfg, ROOT),
         ["MODEL.WEIGHTS", teacher]),
        ("ptq", f"PTQ min-max {bits} (no training)", "ptq", student_cfg,
         common + ["MODEL.QUANT.QUANTIZER", "minmax", "MODEL.QUANT.ATTN_PROB_INIT", "lsq", "MODEL.QUANT.CALIB_BATCHES", "8",
                   *untrained]),
        # The students' quantizers initialised exactly as QAT starts (same config, same calibration
        # batches), not trained: what fine-tuning starts from.
        ("calibrated", f"calibrated start {bits} (no training)", "calibrated", student_cfg, common + untrained),
    ]
    settings = {key: variant_run(args, key, student_cfg, common) for key in args.variants}
    for key, (config, _, iters) in settings.items():  # a picked config, or the defaults
        stage(f"{VARIANTS[key][0]}: {config}, {iters} iterations")
    retrained, alphas = set(), interpolation_alphas(args)
    if args.runs_from and alphas:
        parser.error("--runs-from takes no checkpoints, which interpolated rows need")
    # The slowest variants first, the short evaluations last, so that parallel jobs end together.
    order = sorted(((key, seed) for key in args.variants for seed in args.seeds), key=lambda t: slowest_first(t[0]))
    plan = RunPlan(args.jobs)  # the ETA on each progress line, in the pool's order
    for key, seed in order:
        plan.add(fine_tune_dir(args, key, seed), key, settings[key][2])
    for spec in evaluations:
        plan.add(os.path.join(args.output, spec[2]), "evaluation", 0)
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait: each run is a train_net process
        fine_tunes = [pool.submit(fine_tune, args, key, seed, f"{i + 1} of {len(order)}", settings[key],
                                  retrained, plan, alphas.get(key)) for i, (key, seed) in enumerate(order)]
        rows = [pool.submit(evaluate, args, plan, *spec) for spec in evaluations]
        finished_runs = {t: f.result() for t, f in zip(order, fine_tunes)}
        rows = [f.result() for f in rows]
    if args.control_from:
        rows += control_rows(args.control_from, args)
    for key in args.variants:
        name = VARIANTS[key][0]
        config, opts, _ = settings[key]
        runs = [finished_runs[key, seed][0] for seed in args.seeds]
        interpolated = [finished_runs[key, seed][1] for seed in args.seeds if key in alphas]
        size_mb, gops = size_and_ops(config, opts)
        rows.append({"name": name, "key": key, **mean_over_seeds(runs), "size_mb": size_mb, "gops": gops,
                     "seeds": runs})
        if interpolated:
            rows.append({"name": interpolated_name(name, alphas[key]), "key": key + INTERP,
                         **mean_over_seeds(interpolated), "size_mb": size_mb, "gops": gops, "seeds": interpolated})

    if args.resume:
        rows = with_previous_rows(args, rows, retrained)
    write_results(args, rows)


def evaluate(args, plan: RunPlan, key: str, name: str, run: str, config: str, opts) -> dict:
    """The row of an untrained model (`opts` with --eval-only), or its evaluation kept by --resume."""
    run_dir = os.path.join(args.output, run)
    eval_opts = ["--eval-only", *opts, *args.opts]
    metrics = logged_evaluation(config, run_dir, eval_opts, run_dir + ".log") if args.resume else None
    if metrics:
        plan.finish(run_dir)
        stage(f"{name}: kept the evaluation in {run_dir}.log")
    else:
        plan.start(run_dir)
        stage(f"{name}: evaluating{plan.eta_text()}")
        train_net(config, run_dir, eval_opts, run_dir + ".log")
        metrics = evaluated_metrics(run_dir + ".log")
        plan.finish(run_dir)
    size_mb, gops = size_and_ops(config, opts + args.opts)
    stage(f"{name}: AP {metrics['AP']:.1f}{plan.eta_text()}")
    return {"name": name, "key": key, **metrics, "size_mb": size_mb, "gops": gops, "train_minutes": 0.0,
            "output_dir": run_dir, "numerics": run_numerics(run_dir)}


def interpolation_alphas(args) -> dict:
    """variant -> alpha of its interpolated row: --interpolate for every variant, or the alpha
    each variant's pick got in the --interpolate-from sweep (variants without one get no row).
    Alpha 1 gives no row either: it is the fine-tune itself, whose row is already there."""
    if args.interpolate_from:
        with open(args.interpolate_from) as f:
            picked = json.load(f)["picked"]
        alphas = {key: picked[key]["interpolation"]["alpha"] for key in args.variants
                  if (picked.get(key) or {}).get("interpolation")}
    else:
        alphas = {} if args.interpolate is None else dict.fromkeys(args.variants, args.interpolate)
    itself = [key for key, alpha in alphas.items() if alpha == 1]
    if itself:
        stage(f"interpolation at alpha 1 is the fine-tune itself: no interpolated row for {', '.join(itself)}")
    return {key: alpha for key, alpha in alphas.items() if alpha != 1}


def fine_tune_dir(args, key: str, seed: int) -> str:
    """The folder of variant `key`'s fine-tune with `seed` under --output."""
    return os.path.join(args.output, f"{key}_seed{seed}")


def fine_tune(args, key: str, seed: int, progress: str, setting: tuple, retrained: set, plan: RunPlan,
              alpha=None):
    """One fine-tune of variant `key` with one seed, on `setting` (`variant_run`'s config, options
    and iterations), or the finished run kept by --resume (its folder is added to `retrained` when
    it is trained here); `plan` follows its progress. Returns the run (final metrics, seed,
    minutes, folder) and, given `alpha`, the run interpolated with its start (else None)."""
    name, quantized = VARIANTS[key][:2]
    config, opts, iters = setting
    run_dir = fine_tune_dir(args, key, seed)
    committed = None
    if args.runs_from and not (args.resume and finished(run_dir, iters)):
        expected = load_config(os.path.join(ROOT, config), [*opts, "SEED", str(seed)]).dump()
        committed = committed_run(args.runs_from, os.path.basename(run_dir), expected)
    if committed is not None:
        plan.finish(run_dir)
        stage(f"{name}, seed {seed}: AP {committed['AP']:.1f}, taken finished from {committed['from']}")
        return {**committed, "seed": seed, "output_dir": run_dir}, None
    if args.resume and finished(run_dir, iters):
        plan.finish(run_dir)
        stage(f"{name}, seed {seed}: kept the finished run in {run_dir}")
        minutes = previous_minutes(args.output, run_dir)
    else:
        plan.start(run_dir)
        stage(f"{name}, seed {seed} (fine-tune {progress}): {iters} iterations of "
              f"{PRECISIONS[args.precision] if quantized else 'full precision'} from the teacher{plan.eta_text()}")
        resume = ["--resume"] if args.resume else []

        def follow(line):  # one progress line once the run's speed is known
            per_iter = plan.observe(run_dir, line)
            if per_iter is not None:
                stage(f"{name}, seed {seed}: {per_iter:.2f} s / iteration{plan.eta_text()}")

        minutes = train_net(config, run_dir, [*resume, *opts, "SEED", str(seed)], run_dir + ".log", on_line=follow) / 60
        plan.finish(run_dir)
        retrained.add(run_dir)
    if not math.isnan(minutes):  # also back-fills runs whose time only results.json held
        record_minutes(run_dir, minutes)
    run = {**final_metrics(run_dir), "seed": seed, "train_minutes": minutes, "output_dir": run_dir,
           "numerics": run_numerics(run_dir)}
    stage(f"{name}, seed {seed}: AP {run['AP']:.1f}{plan.eta_text()}")
    if alpha is None:
        return run, None
    metrics = interpolated_metrics(config, run_dir, [*opts, "SEED", str(seed)], alpha, run_dir not in retrained)
    stage(f"{name}, seed {seed}, interpolated with its start at alpha {alpha:g}: AP {metrics['AP']:.1f}")
    return run, {**run, **metrics}


def variant_run(args, key: str, student_cfg: str, common):
    """(config, train_net options, iterations) of variant `key`'s fine-tunes: the config that
    tools/sweep.py picked for it in `--configs` when there is one (it holds the schedule and the
    method's settings; only the checkpoint period, SEED, OUTPUT_DIR and --opts are added), else the
    student config with the quickstart's schedule."""
    picked = os.path.join(ROOT, args.configs, f"{args.arch}_{args.precision}_{key}.yaml")
    if os.path.exists(picked):
        config = os.path.relpath(os.path.abspath(picked), ROOT)
        iters = load_config(os.path.join(ROOT, config), args.opts).SOLVER.MAX_ITER
        return config, checkpoint_opts(iters) + list(args.opts), iters
    return student_cfg, common + variant_opts(key), args.iters


def interpolated_metrics(config: str, run_dir: str, opts, alpha: float, kept: bool):
    """COCO metrics of the finished fine-tune in `run_dir` interpolated with the calibrated model it
    started from (tools/interpolate_weights.py), evaluated like the run itself. The evaluation of
    a kept run is kept too when an earlier quickstart logged exactly this command."""
    weights = os.path.join(run_dir, f"interpolated_{alpha:g}.pth")
    eval_dir = os.path.join(run_dir, f"interpolated_{alpha:g}")
    eval_opts = ["--eval-only", *opts, "MODEL.WEIGHTS", weights, "MODEL_EMA.ENABLED", "False"]
    metrics = logged_evaluation(config, eval_dir, eval_opts, eval_dir + ".log") if kept and os.path.exists(weights) else None
    if metrics:
        return metrics
    cmd = [sys.executable, INTERPOLATE, "--config-file", os.path.join(run_dir, "config.yaml"),
           "--fine-tuned", os.path.join(run_dir, "model_final.pth"), "--alpha", str(alpha), "--output", weights]
    run_logged(cmd, eval_dir + "_weights.log", f"interpolating {run_dir} failed")
    train_net(config, eval_dir, eval_opts, eval_dir + ".log")
    return evaluated_metrics(eval_dir + ".log")


if __name__ == "__main__":
    main()
