"""The whole run's ETA for a tool that runs train_net jobs a few at a time (tools/quickstart.py).

The jobs run in the order they were planned, each taking the first free slot (as a
ThreadPoolExecutor does). What is known of each comes from its own train_net output:

    running fine-tune   Detectron2's `eta:` (training left), plus one evaluation
    queued fine-tune    its iterations x the seconds per iteration its kind logged (a variant's
                        runs all run at one speed); a kind not seen yet takes the mean over kinds
    evaluation          the evaluation time logged so far (`Total inference time`, or a finished
                        evaluation-only job), the mean over them

Nothing is guessed before the first `eta:` line: until then there is no ETA.
"""
import re
import statistics
import threading
import time
from typing import Dict, List, Optional

# Detectron2's periodic line: "eta: 0:06:28  iter: 719 ... time: 1.4914 ..." ("1 day, 2:03:04" for long runs).
EVENTS_LINE = re.compile(r"eta: (?:(\d+) days?, )?(\d+):(\d\d):(\d\d)\s+iter: \d+.*?\stime: ([\d.]+)")
# Detectron2's evaluator summary: "Total inference time: 0:00:22.556382 (...)".
INFERENCE_LINE = re.compile(r"Total inference time: (\d+):(\d\d):([\d.]+)")


class RunPlan:
    """Jobs in submission order, `slots` at a time; `eta_text()` is the whole run's ETA."""

    def __init__(self, slots: int, clock=time.time):
        self.slots = slots
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: Dict[str, dict] = {}  # name -> {"kind", "iters", "state", "started", "left", "seen"}
        self._seconds_per_iter: Dict[str, float] = {}  # kind -> last logged seconds per iteration
        self._evaluations: List[float] = []  # seconds of each evaluation seen

    def add(self, name: str, kind: str, iters: int):
        """Plan a job: a fine-tune of `iters` iterations of variant `kind`, or an evaluation (`iters` 0)."""
        self._jobs[name] = {"kind": kind, "iters": iters, "state": "queued", "left": None, "seen": None}

    def start(self, name: str):
        with self._lock:
            self._jobs[name].update(state="running", started=self._clock())

    def finish(self, name: str):
        with self._lock:
            job = self._jobs[name]
            if job["iters"] == 0 and job["state"] == "running":
                self._evaluations.append(self._clock() - job["started"])
            job["state"] = "done"

    def observe(self, name: str, line: str) -> Optional[float]:
        """Read one line of job `name`'s train_net output. Returns its seconds per iteration when
        this is the first line that gives them (a moment for a progress line), else None."""
        events, inference = EVENTS_LINE.search(line), INFERENCE_LINE.search(line)
        with self._lock:
            job = self._jobs[name]
            if events:
                first = job["left"] is None
                days, hours, minutes, seconds, per_iter = events.groups()
                job["left"] = ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + int(seconds)
                job["seen"] = self._clock()
                self._seconds_per_iter[job["kind"]] = float(per_iter)
                return float(per_iter) if first else None
            elif inference and job["iters"]:
                hours, minutes, seconds = inference.groups()
                self._evaluations.append((int(hours) * 60 + int(minutes)) * 60 + float(seconds))
                job["left"], job["seen"] = 0.0, self._clock()
        return None

    def _evaluation_seconds(self) -> float:
        return statistics.fmean(self._evaluations) if self._evaluations else 0.0

    def _seconds(self, job: dict) -> float:
        """Seconds a job not yet started will take."""
        if job["iters"] == 0:
            return self._evaluation_seconds()
        per_iter = self._seconds_per_iter.get(job["kind"], statistics.fmean(self._seconds_per_iter.values()))
        return job["iters"] * per_iter + self._evaluation_seconds()

    def _left(self, job: dict) -> float:
        """Seconds a running job still needs."""
        if job["iters"] == 0:
            return max(0.0, self._evaluation_seconds() - (self._clock() - job["started"]))
        if job["left"] is None:  # started, no line yet
            return max(0.0, self._seconds(job) - (self._clock() - job["started"]))
        return max(0.0, job["left"] - (self._clock() - job["seen"])) + (self._evaluation_seconds() if job["left"] else 0.0)

    def remaining_seconds(self) -> Optional[float]:
        """Seconds until the last job ends, or None before any job has logged its speed."""
        with self._lock:
            if not self._seconds_per_iter:
                return None
            slots = sorted(self._left(j) for j in self._jobs.values() if j["state"] == "running")
            slots += [0.0] * max(0, self.slots - len(slots))
            for job in (j for j in self._jobs.values() if j["state"] == "queued"):
                slots.sort()
                slots[0] += self._seconds(job)
            return max(slots)

    def eta_text(self) -> str:
        """" (ETA 08:12, 14 min left)", or "" while the speed is unknown."""
        left = self.remaining_seconds()
        if left is None:
            return ""
        return f" (ETA {time.strftime('%H:%M', time.localtime(self._clock() + left))}, {left / 60:.0f} min left)"
