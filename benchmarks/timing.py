"""Timing shared by the benchmarks: a median timer, and the training step and eval latency of
models compared with each other, measured in turns."""
import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, List

import torch


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats, device):
    """Median seconds of `repeats` calls after two warm-up calls."""
    return round_robin([fn], repeats, device)[0]


def round_robin(fns, repeats, device) -> List[float]:
    """Median seconds of each of `fns` over `repeats` rounds, after two warm-up rounds. Each round
    calls every function once, in turn: on a shared machine a slow spell then falls on all of
    them alike, instead of on whichever model was being timed (one model after another, the
    same batch-1 eval measured 1.05x float in one run and 1.24x in the next)."""
    times = [[] for _ in fns]
    for i in range(repeats + 2):
        for fn, spent in zip(fns, times):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if i >= 2:
                spent.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


@dataclass
class Subject:
    """One model under test: its optimizer, training batch and one-image eval input (a list of
    one Detectron2 input), and the context every call of it runs in."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batch: list
    image: list
    context: Callable[[], ContextManager] = contextlib.nullcontext

    def train_step(self):
        with self.context():
            loss = sum(self.model(self.batch).values())
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()

    def evaluate(self):
        with self.context(), torch.no_grad():
            self.model(self.image)


def _resident_bytes(s: Subject) -> int:
    """Bytes of a subject's parameters, buffers, gradients and optimizer state."""
    tensors = [*s.model.parameters(), *s.model.buffers()]
    tensors += [p.grad for p in s.model.parameters() if p.grad is not None]
    tensors += [t for state in s.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors if t.is_cuda)


def train_and_eval_times(subjects: List[Subject], device, train_repeats, eval_repeats) -> List[dict]:
    """Median training step (forward, backward, optimizer step) and eval latency of each subject,
    the subjects taking turns (`round_robin`), with peak training memory on CUDA."""
    for s in subjects:
        s.model.train()
    steps = round_robin([s.train_step for s in subjects], train_repeats, device)
    for s in subjects:
        s.model.eval()
    latencies = round_robin([s.evaluate for s in subjects], eval_repeats, device)
    rows = []
    for s, step, latency in zip(subjects, steps, latencies):
        peak = None
        if device == "cuda":
            # The other subjects stay resident: count only what this one holds and allocates.
            others = torch.cuda.memory_allocated() - _resident_bytes(s)
            torch.cuda.reset_peak_memory_stats()
            s.model.train()
            s.train_step()
            peak = (torch.cuda.max_memory_allocated() - others) / 2**20
        rows.append({"batch": len(s.batch), "train_step_s": step, "train_iter_per_s": 1 / step,
                     "eval_latency_s": latency, "eval_images_per_s": 1 / latency, "peak_train_memory_mb": peak,
                     "parameters": sum(p.numel() for p in s.model.parameters())})
    return rows


def add_ratios(rows: list) -> list:
    """Each row's train step and eval latency as ratios to the first row's (the float model)."""
    for r in rows:
        r["train_ratio"] = r["train_step_s"] / rows[0]["train_step_s"]
        r["eval_ratio"] = r["eval_latency_s"] / rows[0]["eval_latency_s"]
    return rows
