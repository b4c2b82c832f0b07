"""Timing shared by the benchmarks: a median timer and one model's training step and eval latency."""
import statistics
import time

import torch


def timed(fn, repeats, device):
    """Median seconds of `repeats` calls after two warm-up calls."""
    times = []
    for i in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_and_eval_times(model, optimizer, batch, image, device, train_repeats, eval_repeats) -> dict:
    """Median training step (forward, backward, optimizer step on `batch`) and eval latency (on
    `image`, a one-image input list) of `model`, with peak training memory on CUDA."""
    def train_step():
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.train()
    step = timed(train_step, train_repeats, device)
    model.eval()
    with torch.no_grad():
        latency = timed(lambda: model(image), eval_repeats, device)
    peak = None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        model.train()
        train_step()
        peak = torch.cuda.max_memory_allocated() / 2**20
    return {"batch": len(batch), "train_step_s": step, "train_iter_per_s": 1 / step, "eval_latency_s": latency,
            "eval_images_per_s": 1 / latency, "peak_train_memory_mb": peak,
            "parameters": sum(p.numel() for p in model.parameters())}


def add_ratios(rows: list) -> list:
    """Each row's train step and eval latency as ratios to the first row's (the float model)."""
    for r in rows:
        r["train_ratio"] = r["train_step_s"] / rows[0]["train_step_s"]
        r["eval_ratio"] = r["eval_latency_s"] / rows[0]["eval_latency_s"]
    return rows
