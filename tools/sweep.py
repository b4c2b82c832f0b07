#!/usr/bin/env python
"""Tune every ablation variant with the same budget, on shapes_holdout only.

    python tools/sweep.py --space tools/sweep_spaces/detr_methods.yaml --precision w3a3 \\
        --variants lsq aux distill aq --budget 6 --output output/sweep_detr_w3a3 [--resume] \\
        [--alphas 0.5 0.75 1.0] [--write-configs configs/shapes/picked] [--status]

The space file (YAML) lists knobs: `shared` ones every variant tunes (learning rate, schedule,
EMA, ...) and per-variant ones under `variants` (auxiliary-query mode, K and weight;
distillation weights; `inherit: [aux, distill]` takes other variants' knobs). A knob is a
config key with a list of values, or a name with a list of option dicts that go together
(e.g. an EMA on/off switch with its decay). Each variant gets `--budget` trials drawn without
replacement from the product of its knobs (all of them when the product is smaller), in an
order fixed by `--draw-seed`: the same budget for every variant.

Two stages keep the control honest: `--control fp` first picks the shared knobs (the schedule)
as the point where the `--variants` (e.g. LSQ) do best on holdout among those where the teacher
fine-tuned unquantized on it stays within `--control-tolerance` AP of the teacher; then
`--schedule-from` that sweep.json tunes only the methods' own knobs, on that schedule.

Each trial fine-tunes from the teacher (tools/quickstart.py's options) and is evaluated on
shapes_holdout; shapes_val is never read. The tool writes `sweep.json` (every trial with its
holdout metrics, and the pick: the best holdout AP per variant) and `sweep.md` to `--output`
(or `--results`).
With `--alphas`, each pick is also interpolated with its calibrated start
(tools/interpolate_weights.py) at each alpha and the best alpha on holdout is picked.
`--write-configs DIR` writes each pick as a config (`<arch>_<precision>_<variant>.yaml`) that
reproduces the fine-tune with train_net.py alone, given SEED and OUTPUT_DIR; stage one writes
the control's and the variants' configs on the picked schedule.

`--jobs N` runs N trials at once, each with 1/N of the cores (OMP_NUM_THREADS, unless set): on a
2-core CPU two single-threaded fine-tunes finish 1.28x sooner than one after the other on two
threads (the shapes models' small tensors keep a second thread half idle). A thread count
changes float rounding, so trials run with different --jobs are not bit-identical.
"""
import argparse
import ast
import hashlib
import itertools
import json
import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor

import yaml

from aqdetr_d2.experiments.runs import (HOLDOUT, ROOT, evaluated_metrics, final_metrics, finished, last_value,
                                        logged_evaluation, record_minutes, recorded_minutes, run_logged, share_cores,
                                        stage, train_net)
from aqdetr_d2.experiments.shapes_ablation import (ARCHS, PRECISIONS, VARIANTS, fine_tune_opts, slowest_first,
                                                   variant_opts)

INTERPOLATE = os.path.join(ROOT, "tools", "interpolate_weights.py")


def load_space(path: str) -> dict:
    """The space file, checked: {"shared": {knob: values}, "variants": {variant: {knob: values}}}."""
    with open(path) as f:
        space = yaml.safe_load(f) or {}
    unknown = set(space) - {"shared", "variants"}
    if unknown:
        raise SystemExit(f"{path}: unknown sections {sorted(unknown)}; a space has 'shared' and 'variants'")
    for variant in space.get("variants", {}):
        if variant not in VARIANTS:
            raise SystemExit(f"{path}: unknown variant {variant!r}; variants are {sorted(VARIANTS)}")
    for name, values in _all_knobs(space):
        if not isinstance(values, list) or not values:
            raise SystemExit(f"{path}: knob {name!r} needs a non-empty list of values")
    return space


def _all_knobs(space):
    yield from space.get("shared", {}).items()
    for knobs in space.get("variants", {}).values():
        yield from ((k, v) for k, v in knobs.items() if k != "inherit")


def variant_knobs(space: dict, variant: str) -> dict:
    """The knobs `variant` tunes: the shared ones, its own, and those of the variants it inherits."""
    own = dict(space.get("variants", {}).get(variant, {}))
    knobs = dict(space.get("shared", {}))
    for parent in own.pop("inherit", []):
        knobs.update(variant_knobs(space, parent))
    knobs.update(own)
    return knobs


def trial_opts(knobs: dict, choice: tuple) -> list:
    """KEY VALUE options of one point of the knobs' product (option-dict knobs expanded)."""
    opts = []
    for (name, _), value in zip(knobs.items(), choice):
        items = value.items() if isinstance(value, dict) else [(name, value)]
        for key, v in items:
            opts += [key, str(v)]
    return opts


def draw_trials(space: dict, variant: str, budget: int, draw_seed: int) -> list:
    """`budget` option lists for `variant`, without replacement, in a fixed shuffled order."""
    knobs = variant_knobs(space, variant)
    points = list(itertools.product(*knobs.values()))
    random.Random(f"{draw_seed}:{variant}").shuffle(points)
    return [trial_opts(knobs, p) for p in points[:budget]]


def trial_name(variant: str, opts: list) -> str:
    return f"{variant}_{hashlib.sha1(json.dumps(opts).encode()).hexdigest()[:8]}"


def trial_plan(args, common: list, variant: str, opts: list):
    """(run folder, train_net options, iterations) of one trial."""
    full = common + variant_opts(variant) + opts + HOLDOUT + ["SEED", str(args.seed)]
    return os.path.join(args.output, trial_name(variant, opts)), full, int(last_value(full, "SOLVER.MAX_ITER", str(args.iters)))


def run_trial(args, student_cfg: str, common: list, variant: str, opts: list) -> dict:
    run_dir, full, iters = trial_plan(args, common, variant, opts)
    if args.resume and finished(run_dir, iters):
        stage(f"{variant} {os.path.basename(run_dir)}: kept the finished trial")
        minutes = recorded_minutes(run_dir)
        # What it ran with, as recorded when it ran (options that change no result, such as the
        # checkpoint period, may have changed since).
        full = args.recorded_opts.get(os.path.basename(run_dir), full)
    else:
        stage(f"{variant} {os.path.basename(run_dir)}: {' '.join(opts) or 'defaults'}")
        minutes = train_net(student_cfg, run_dir, (["--resume"] if args.resume else []) + full, run_dir + ".log") / 60
        record_minutes(run_dir, minutes)
    metrics = final_metrics(run_dir)
    stage(f"{variant} {os.path.basename(run_dir)}: holdout AP {metrics['AP']:.1f}")
    return {"variant": variant, "trial": os.path.basename(run_dir), "opts": opts, "train_opts": full,
            "holdout": metrics, "train_minutes": minutes, "output_dir": run_dir}


def recorded_train_opts(sweep_json: str) -> dict:
    """trial -> the train_net options an earlier run of this sweep recorded for it ({} if none)."""
    try:
        with open(sweep_json) as f:
            return {t["trial"]: t["train_opts"] for t in json.load(f)["trials"]}
    except (OSError, ValueError, KeyError):
        return {}


def method_trials(args, space: dict) -> list:
    """Stage two's (variant, opts) trials: each variant's own draws."""
    return [(v, opts) for v in args.variants for opts in draw_trials(space, v, args.budget, args.draw_seed)]


def write_status(args, space: dict, common: list):
    """--status: each trial's holdout AP where finished (from the run's own metrics.json), else
    "not finished", printed and written to sweep_status.md. Trains and evaluates nothing."""
    if args.control:
        draws = draw_trials({"shared": space.get("shared", {})}, "shared", args.budget, args.draw_seed)
        todo = [(v, opts) for opts in draws for v in (args.control, *args.variants)]
    else:
        todo = method_trials(args, space)
    lines = [f"Trials so far of `python tools/sweep.py {' '.join(a for a in sys.argv[1:] if a != '--status')}`", "",
             "| variant | trial | options | holdout AP | AP50 | AP75 |", "|---|---|---|---|---|---|"]
    for variant, opts in todo:
        run_dir, _, iters = trial_plan(args, common, variant, opts)
        m = final_metrics(run_dir) if finished(run_dir, iters) else None
        scores = f"{m['AP']:.2f} | {m['AP50']:.2f} | {m['AP75']:.2f}" if m else "not finished | | "
        lines.append(f"| {variant} | {os.path.basename(run_dir)} | `{' '.join(opts) or 'defaults'}` | {scores} |")
    os.makedirs(results_dir(args), exist_ok=True)
    with open(os.path.join(results_dir(args), "sweep_status.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_trials(args, student_cfg: str, common: list, todo: list) -> list:
    """`run_trial` for each (variant, opts) of `todo`, `--jobs` at a time, the slowest variants
    (distillation, then auxiliary queries) first so that the jobs end together; results in
    `todo`'s order."""
    if args.jobs == 1:
        return [run_trial(args, student_cfg, common, variant, opts) for variant, opts in todo]
    order = sorted(range(len(todo)), key=lambda i: slowest_first(todo[i][0]))
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait: each trial is a train_net process
        futures = {i: pool.submit(run_trial, args, student_cfg, common, *todo[i]) for i in order}
        return [futures[i].result() for i in range(len(todo))]


def teacher_holdout_ap(args, teacher: str) -> float:
    """The teacher's own AP on shapes_holdout, the level the control must hold."""
    eval_dir = os.path.join(args.output, "teacher_holdout")
    config, opts = teacher + ".yaml", ["--eval-only", "MODEL.WEIGHTS", teacher + ".pth", *HOLDOUT]
    metrics = logged_evaluation(config, eval_dir, opts, eval_dir + ".log") if args.resume else None
    if metrics is None:
        train_net(config, eval_dir, opts, eval_dir + ".log")
        metrics = evaluated_metrics(eval_dir + ".log")
    stage(f"teacher: holdout AP {metrics['AP']:.1f}")
    return metrics["AP"]


def pick_schedule(args, space: dict, student_cfg: str, common: list, teacher: str):
    """Stage one: the shared knobs (the schedule). Each drawn point fine-tunes the control (the
    teacher unquantized) and `--variants`; the pick is the point whose variants score best on
    holdout among those whose control stays within `--control-tolerance` AP of the teacher."""
    teacher_ap = teacher_holdout_ap(args, teacher)
    draws = draw_trials({"shared": space.get("shared", {})}, "shared", args.budget, args.draw_seed)
    variants = [args.control, *args.variants]
    trials = run_trials(args, student_cfg, common, [(v, opts) for opts in draws for v in variants])
    points = []
    for i, opts in enumerate(draws):
        control, *runs = trials[i * len(variants):(i + 1) * len(variants)]
        shift = control["holdout"]["AP"] - teacher_ap
        points.append({"opts": opts, "control_shift": shift, "holds": abs(shift) <= args.control_tolerance,
                       "variants_AP": sum(r["holdout"]["AP"] for r in runs) / len(runs)})
    holding = [p for p in points if p["holds"]]
    best = max(holding, key=lambda p: p["variants_AP"]) if holding else None
    picked = {"schedule": best, "teacher_holdout_AP": teacher_ap, "points": points}
    if best is None:
        stage(f"no drawn schedule keeps {args.control} within {args.control_tolerance} AP of the teacher")
    else:
        stage(f"schedule: {' '.join(best['opts'])} ({args.control} {best['control_shift']:+.2f} AP)")
    return trials, picked


def pick_alpha(args, student_cfg: str, trial: dict) -> dict:
    """Holdout AP of the pick interpolated with its calibrated start at each of `--alphas`."""
    run_dir, scores = trial["output_dir"], {}
    for alpha in args.alphas:
        weights = os.path.join(run_dir, f"interpolated_{alpha:g}.pth")
        eval_dir = os.path.join(run_dir, f"interpolated_{alpha:g}_holdout")
        eval_opts = ["--eval-only", *trial["train_opts"], "MODEL.WEIGHTS", weights, "MODEL_EMA.ENABLED", "False"]
        metrics = logged_evaluation(student_cfg, eval_dir, eval_opts, eval_dir + ".log") if args.resume else None
        if metrics is None:
            run_logged([sys.executable, INTERPOLATE, "--config-file", os.path.join(run_dir, "config.yaml"),
                        "--fine-tuned", os.path.join(run_dir, "model_final.pth"), "--alpha", str(alpha),
                        "--output", weights], eval_dir + "_weights.log", f"interpolating {run_dir} failed")
            train_net(student_cfg, eval_dir, eval_opts, eval_dir + ".log")
            metrics = evaluated_metrics(eval_dir + ".log")
        scores[f"{alpha:g}"] = metrics["AP"]
        stage(f"{trial['variant']}: interpolated at alpha {alpha:g}, holdout AP {metrics['AP']:.1f}")
    best = max(scores, key=scores.get)
    return {"holdout_AP": scores, "alpha": float(best)}


def _config_value(text: str):
    """A KEY VALUE option's value as yacs reads it (literal_eval, else the string)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return list(value) if isinstance(value, tuple) else value


def picked_config(args, student_cfg: str, trial: dict, sweep_path: str) -> str:
    """YAML text of a config that reproduces `trial` on `student_cfg` (the trial's own student
    config, or another precision's): every option but the holdout evaluation, SEED, OUTPUT_DIR
    and the checkpoint period, which the caller chooses."""
    tree: dict = {}
    opts = trial["train_opts"]
    for key, value in zip(opts[::2], opts[1::2]):
        if key in ("DATASETS.TEST", "SEED", "SOLVER.CHECKPOINT_PERIOD"):  # the caller's, changing no result
            continue
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = _config_value(value)
    header = (f"# {VARIANTS[trial['variant']][0]}: settings picked by tools/sweep.py on shapes_holdout at "
              f"{PRECISIONS[args.precision]}\n# (trial {trial['trial']}, holdout AP {trial['holdout']['AP']:.1f}; "
              f"every trial in {os.path.relpath(sweep_path, ROOT)}).\n")
    base = os.path.relpath(os.path.join(ROOT, student_cfg), os.path.join(ROOT, args.write_configs))
    return header + yaml.safe_dump({"_BASE_": base, **tree}, sort_keys=False)


def schedule_of(sweep_json):
    """The KEY VALUE options of the schedule a --control sweep picked ([] without one)."""
    if not sweep_json:
        return []
    with open(sweep_json) as f:
        schedule = json.load(f)["picked"].get("schedule")
    if schedule is None:
        raise SystemExit(f"{sweep_json} picked no schedule: none of its points held the control")
    return schedule["opts"]


def results_dir(args) -> str:
    """Where sweep.json and sweep.md are written."""
    return args.results or args.output


def write_outputs(args, trials, picked):
    os.makedirs(results_dir(args), exist_ok=True)
    path = os.path.join(results_dir(args), "sweep.json")
    with open(path, "w") as f:
        recorded = {k: v for k, v in vars(args).items() if k != "recorded_opts"}
        json.dump({"args": recorded, "trials": trials, "picked": picked}, f, indent=2)
    lines = [f"Command: `python tools/sweep.py {' '.join(sys.argv[1:])}`", "",
             "| variant | trial | options | holdout AP | AP50 | AP75 | picked |", "|---|---|---|---|---|---|---|"]
    schedule = picked.get("schedule")  # stage one: the trials on the picked schedule are the picks
    for t in trials:
        mark = "yes" if ((picked.get(t["variant"]) or {}).get("trial") == t["trial"]
                         or (schedule is not None and t["opts"] == schedule["opts"])) else ""
        lines.append(f"| {t['variant']} | {t['trial']} | `{' '.join(t['opts'])}` | {t['holdout']['AP']:.1f} | "
                     f"{t['holdout']['AP50']:.1f} | {t['holdout']['AP75']:.1f} | {mark} |")
    for variant, p in picked.items():
        interpolation = p.get("interpolation") if isinstance(p, dict) else None
        if interpolation:
            lines.append(f"\n{variant}: interpolation alpha {interpolation['alpha']:g} (holdout AP by alpha: "
                         f"{interpolation['holdout_AP']})")
    if "points" in picked:
        lines += ["", f"Teacher on holdout: {picked['teacher_holdout_AP']:.1f} AP.", "",
                  "| schedule | control shift (AP) | holds | variants' holdout AP |", "|---|---|---|---|"]
        lines += [f"| `{' '.join(p['opts'])}` | {p['control_shift']:+.2f} | {'yes' if p['holds'] else 'no'} | "
                  f"{p['variants_AP']:.1f} |" for p in picked["points"]]
        lines += ["", f"Picked schedule: `{' '.join(schedule['opts'])}`" if schedule else
                  "Picked schedule: none (no drawn schedule keeps the control within the tolerance)"]
    with open(os.path.join(results_dir(args), "sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", required=True, help="YAML file of the knobs to tune")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="detr")
    parser.add_argument("--precision", choices=list(PRECISIONS), default="w4a4")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), required=True)
    parser.add_argument("--budget", type=int, required=True, help="trials per variant")
    parser.add_argument("--iters", type=int, default=400, help="fine-tuning iterations unless a knob sets them")
    parser.add_argument("--seed", type=int, default=1, help="training seed of every trial")
    parser.add_argument("--draw-seed", type=int, default=0, help="order in which trials are drawn")
    parser.add_argument("--alphas", type=float, nargs="*", default=[],
                        help="also pick an interpolation alpha for each variant's pick")
    parser.add_argument("--write-configs", metavar="DIR", help="write each pick as a config into DIR")
    parser.add_argument("--config-precisions", nargs="+", choices=list(PRECISIONS),
                        help="write the picks for these precisions too (default: --precision only)")
    parser.add_argument("--control", choices=list(VARIANTS),
                        help="stage one: pick the shared knobs (the schedule) with this control variant (fp), "
                             "which must stay within --control-tolerance of the teacher on holdout")
    parser.add_argument("--control-tolerance", type=float, default=0.5, help="AP the control may move")
    parser.add_argument("--schedule-from", metavar="SWEEP_JSON",
                        help="stage two: every trial uses the schedule a --control sweep picked")
    parser.add_argument("--output", required=True)
    parser.add_argument("--results", metavar="DIR",
                        help="where sweep.json and sweep.md go (default --output), e.g. the folder they are committed in")
    parser.add_argument("--resume", action="store_true", help="keep finished trials, resume unfinished ones")
    parser.add_argument("--jobs", type=int, default=1, help="trials run at once, each with 1/jobs of the cores")
    parser.add_argument("--status", action="store_true",
                        help="run nothing: write the trials' holdout AP so far to sweep_status.md (in --results)")
    args = parser.parse_args(argv)
    if args.budget < 1 or args.jobs < 1:
        parser.error("--budget and --jobs must be at least 1")
    if args.jobs > 1:
        share_cores(args.jobs)
    if any(not 0.0 <= a <= 1.0 for a in args.alphas):
        parser.error("--alphas must lie in [0, 1]")
    space = load_space(args.space)
    args.recorded_opts = recorded_train_opts(os.path.join(results_dir(args), "sweep.json"))
    if args.schedule_from:  # the schedule is fixed: only the methods' own knobs are drawn
        space = {**space, "shared": {}}

    # Relative to the root, where every run starts: the picked configs name it so too.
    committed = os.path.join("docs", "quickstart", f"{args.arch}_teacher")
    if not os.path.exists(os.path.join(ROOT, committed + ".pth")):
        raise SystemExit(f"no committed teacher {committed}.pth; train one with tools/quickstart.py --train-teacher")
    student_cfg = ARCHS[args.arch]["student"].format(p=args.precision)
    common = fine_tune_opts(committed + ".pth", committed + ".yaml", args.iters) + schedule_of(args.schedule_from)
    if args.status:
        write_status(args, space, common)
        return
    os.makedirs(args.output, exist_ok=True)
    if args.control:
        trials, picked = pick_schedule(args, space, student_cfg, common, committed)
        path = write_outputs(args, trials, picked)
        if picked["schedule"] is not None:
            on_schedule = [t for t in trials if t["opts"] == picked["schedule"]["opts"]]
            write_picked_configs(args, on_schedule, path)
        return
    trials = run_trials(args, student_cfg, common, method_trials(args, space))
    best = {v: max((t for t in trials if t["variant"] == v), key=lambda t: t["holdout"]["AP"]) for v in args.variants}
    picked = {v: {"trial": t["trial"], "opts": t["opts"], "holdout_AP": t["holdout"]["AP"]} for v, t in best.items()}
    interpolated = [v for v in args.variants if args.alphas and VARIANTS[v][1]]
    with ThreadPoolExecutor(args.jobs) as pool:  # each variant's evaluations in one job
        for variant, interpolation in zip(interpolated, pool.map(lambda v: pick_alpha(args, student_cfg, best[v]),
                                                                 interpolated)):
            picked[variant]["interpolation"] = interpolation
    path = write_outputs(args, trials, picked)
    write_picked_configs(args, [next(t for t in trials if t["trial"] == p["trial"]) for p in picked.values()], path)


def write_picked_configs(args, picks: list, sweep_path: str):
    """With --write-configs, each trial of `picks` as a config, for every --config-precisions."""
    if not args.write_configs:
        return
    os.makedirs(args.write_configs, exist_ok=True)
    for trial in picks:
        for precision in args.config_precisions or [args.precision]:
            name = os.path.join(args.write_configs, f"{args.arch}_{precision}_{trial['variant']}.yaml")
            with open(name, "w") as f:
                f.write(picked_config(args, ARCHS[args.arch]["student"].format(p=precision), trial, sweep_path))
            stage(f"{trial['variant']}: picked config {name}")


if __name__ == "__main__":
    main()
