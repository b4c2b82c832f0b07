"""Experiments as train_net.py runs: each run a subprocess with its own log, its COCO metrics read
back from Detectron2's logs (tools/quickstart.py, tools/sweep.py)."""
import json
import os
import subprocess
import sys
import time

from ..utils.numerics import NUMERICS_TAG

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_NET = os.path.join(ROOT, "projects", "AQDETR", "train_net.py")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# train_net options that evaluate on the split every choice is made on (shapes_val is evaluated once).
HOLDOUT = ["DATASETS.TEST", "('shapes_holdout',)"]
# Written into each fine-tune's folder: the minutes its last train_net call took.
MINUTES_FILE = "quickstart_minutes.json"
# glibc hands every freed block over 32 MB back to the OS, so each new attention-map-sized tensor
# pays its page faults again; keeping freed memory in the heap took the DETR W4A4A4 quickstart
# from 30.2 to 20.1 minutes on 2 cores with identical metrics. Other C libraries ignore it; a
# GLIBC_TUNABLES of the user's own is kept.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=2147483647:glibc.malloc.trim_threshold=2147483647"


_START = time.time()


def stage(message: str):
    """One progress line: wall time, minutes since the tool started, `message`."""
    elapsed = (time.time() - _START) / 60
    print(f"[{os.path.basename(sys.argv[0])} {time.strftime('%H:%M:%S')}, {elapsed:.1f} min] {message}", flush=True)


def share_cores(jobs: int):
    """Give each of `jobs` parallel runs 1/jobs of the cores (OMP_NUM_THREADS, which the train_net
    processes inherit; one the user set wins)."""
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))


def train_net_command(config: str, output_dir: str, opts):
    return [sys.executable, TRAIN_NET, "--config-file", os.path.join(ROOT, config), *opts, "OUTPUT_DIR", output_dir]


def log_header(cmd) -> str:
    """The first line of a run's log: the command it ran."""
    return "$ " + " ".join(cmd) + "\n"


def train_net(config: str, output_dir: str, opts, log_path: str, on_line=None) -> float:
    """Run train_net.py; its output goes to the terminal and `log_path`. Returns seconds taken."""
    return run_logged(train_net_command(config, output_dir, opts), log_path, f"train_net failed ({config})", on_line)


def run_logged(cmd, log_path: str, failure: str, on_line=None) -> float:
    """Run `cmd` from the project root with its output in `log_path` (first line: the command) and
    Detectron2's ETA, evaluation and error lines on the terminal; exits with `failure` if it fails.
    `on_line`, if given, is called with every line of the output. Returns seconds taken."""
    start = time.time()
    with open(log_path, "w") as log:
        log.write(log_header(cmd))
        log.flush()
        env = {**os.environ, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", MALLOC_TUNABLES)}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
        for line in proc.stdout:
            log.write(line)
            if on_line is not None:
                on_line(line)
            if "eta:" in line or "copypaste" in line or "Error" in line:
                sys.stdout.write(line)
        if proc.wait() != 0:
            raise SystemExit(f"{failure}; see {log_path}")
    return time.time() - start


def copypaste_metrics(lines):
    """The COCO box metrics in Detectron2's "copypaste" lines among `lines`, or None."""
    values = [line.split("copypaste: ", 1)[1].strip() for line in lines if "copypaste: " in line]
    for header, row in zip(values, values[1:]):
        if header.startswith("AP,AP50"):
            return dict(zip(header.split(","), (float(v) for v in row.split(","))))
    return None


def evaluated_metrics(log_path: str):
    """The COCO box metrics an `--eval-only` run printed (Detectron2's "copypaste" lines)."""
    with open(log_path) as f:
        metrics = copypaste_metrics(f)
    if metrics is None:
        raise SystemExit(f"no COCO evaluation in {log_path}")
    return metrics


def logged_evaluation(config: str, output_dir: str, opts, log_path: str):
    """The COCO metrics in `log_path` if an earlier run of exactly this train_net command wrote
    them (the log's first line is the command), else None: `--resume` then skips the re-evaluation."""
    try:
        with open(log_path) as f:
            if f.readline() != log_header(train_net_command(config, output_dir, opts)):
                return None
            return copypaste_metrics(f)
    except OSError:
        return None


def _evaluations(output_dir: str):
    """The COCO evaluations a run logged in Detectron2's metrics.json, oldest first (none if the
    run never got as far as writing it)."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if '"bbox/AP"' in line]


def final_metrics(output_dir: str):
    """The last COCO evaluation logged in Detectron2's metrics.json."""
    rows = _evaluations(output_dir)
    if not rows:
        raise SystemExit(f"no evaluation in {output_dir}/metrics.json")
    return {k.split("/", 1)[1]: v for k, v in rows[-1].items() if k.startswith("bbox/") and "-" not in k}


def run_numerics(output_dir: str):
    """The distinct numerics lines train_net.py logged to `output_dir`/log.txt, oldest first: one
    for a run made under one set of CPU instructions, more for one resumed under another, none for
    a run from before train_net.py logged them."""
    try:
        with open(os.path.join(output_dir, "log.txt")) as f:
            return logged_numerics(f)
    except OSError:
        return []


def logged_numerics(lines):
    """The distinct numerics lines among a train_net.py log's `lines`, oldest first."""
    return list(dict.fromkeys(line.split(NUMERICS_TAG, 1)[1].strip() for line in lines if NUMERICS_TAG in line))


def finished(output_dir: str, iters: int) -> bool:
    """True when a run saved its final model and evaluated it at its end: Detectron2 logs that
    evaluation at iteration `iters - 1` (periodic) or `iters` (after training, EVAL_PERIOD 0)."""
    if not os.path.exists(os.path.join(output_dir, "model_final.pth")):
        return False
    rows = _evaluations(output_dir)
    return bool(rows) and rows[-1]["iteration"] in (iters - 1, iters)


def last_value(opts, key: str, default: str) -> str:
    """The value train_net would use for `key` from KEY VALUE `opts` (the last one wins)."""
    values = [opts[i + 1] for i in range(0, len(opts) - 1, 2) if opts[i] == key]
    return values[-1] if values else default


def record_minutes(run_dir: str, minutes: float):
    """Keep a fine-tune's training minutes in its own folder, where a later `--resume` finds them
    whatever results file has been rewritten since (e.g. by a run with fewer seeds)."""
    with open(os.path.join(run_dir, MINUTES_FILE), "w") as f:
        json.dump({"train_minutes": minutes}, f)


def recorded_minutes(run_dir: str) -> float:
    """The minutes `record_minutes` kept for `run_dir`, else NaN (a time nobody measured)."""
    try:
        with open(os.path.join(run_dir, MINUTES_FILE)) as f:
            return float(json.load(f)["train_minutes"])
    except (OSError, ValueError, KeyError, TypeError):
        return float("nan")
