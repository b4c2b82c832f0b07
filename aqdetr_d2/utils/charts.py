"""Charts of numbers rather than images: query-value histograms of teacher against student, and
the ablation's bar chart. Drawn like every picture here (visualization.py): a matplotlib Figure
on an Agg canvas, no pyplot."""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from torch import Tensor

from .visualization import STUDENT_COLOR, TEACHER_COLOR, new_figure, save_figure

__all__ = ["ablation_bar_chart", "query_hidden_states", "query_histograms"]


def query_hidden_states(outputs: Dict) -> Tensor:
    """Decoder outputs of the object queries of every layer, (L, B, Q, C), from `predict`'s
    outputs of either meta-architecture (DETR: normalized by the decoder's shared norm)."""
    return outputs["states"].decoder_states


def _histogram_kl(p_counts: np.ndarray, q_counts: np.ndarray, eps: float = 1e-6) -> float:
    """KL(p || q) in nats of two histograms over the same bins, both smoothed by `eps`."""
    p = p_counts / max(p_counts.sum(), 1) + eps
    q = q_counts / max(q_counts.sum(), 1) + eps
    p, q = p / p.sum(), q / q.sum()
    return float((p * np.log(p / q)).sum())


def query_histograms(teacher_states: Sequence[np.ndarray], student_states: Sequence[np.ndarray],
                     output_path: str, labels: Tuple[str, str] = ("teacher fp32", "student"),
                     paired: bool = True, bins: int = 80, title: Optional[str] = None,
                     clip_percentile: float = 0.1) -> List[Dict[str, float]]:
    """One subplot per decoder layer: the distribution of query values (every channel of every
    object query) of the float teacher and the quantized student, overlaid.

    Args:
        teacher_states, student_states: per layer, arrays of any shape (flattened).
        paired: the two hold the same queries of the same images element for element (learned
            queries); then the mean absolute difference is reported. Two-stage Deformable-DETR
            selects its queries from its own encoder, so they are not paired.
        clip_percentile: the shared bin range spans the [p, 100 - p] percentiles of both sets.
    Returns:
        per layer {"kl": KL(teacher || student) of the histograms, "mean_abs_diff" (NaN when
        unpaired), "teacher_mean", "teacher_std", "student_mean", "student_std"}.
    """
    if len(teacher_states) != len(student_states):
        raise ValueError(f"{len(teacher_states)} teacher layers vs {len(student_states)} student layers")
    num_layers = len(teacher_states)
    ncols = min(num_layers, 3)
    nrows = math.ceil(num_layers / ncols)
    fig, axes = new_figure(nrows, ncols, (4.0, 3.0))
    stats = []
    for lid, (t, s) in enumerate(zip(teacher_states, student_states)):
        t = np.asarray(t, dtype=np.float64).ravel()
        s = np.asarray(s, dtype=np.float64).ravel()
        both = np.concatenate([t, s])
        lo, hi = np.percentile(both, [clip_percentile, 100 - clip_percentile])
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        t_counts, _ = np.histogram(np.clip(t, lo, hi), edges)
        s_counts, _ = np.histogram(np.clip(s, lo, hi), edges)
        row = {"kl": _histogram_kl(t_counts, s_counts),
               "mean_abs_diff": float(np.abs(t - s).mean()) if paired and t.shape == s.shape else float("nan"),
               "teacher_mean": float(t.mean()), "teacher_std": float(t.std()),
               "student_mean": float(s.mean()), "student_std": float(s.std())}
        stats.append(row)
        ax = axes[lid // ncols, lid % ncols]
        ax.hist(edges[:-1], edges, weights=t_counts, density=True, histtype="stepfilled", alpha=0.45,
                color=TEACHER_COLOR, label=labels[0])
        ax.hist(edges[:-1], edges, weights=s_counts, density=True, histtype="step", linewidth=1.5,
                color=STUDENT_COLOR, label=labels[1])
        diff = f"mean |diff| = {row['mean_abs_diff']:.4f}" if paired else "unpaired queries"
        ax.text(0.02, 0.97, f"KL = {row['kl']:.4f}\n{diff}", transform=ax.transAxes, va="top", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
        ax.set_title(f"decoder layer {lid}", fontsize=9)
        ax.set_xlabel("query value", fontsize=8)
        ax.tick_params(labelsize=7)
        if lid == 0:
            ax.legend(fontsize=7, loc="upper right")
    for extra in range(num_layers, nrows * ncols):
        axes[extra // ncols, extra % ncols].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    save_figure(fig, output_path)
    return stats


# --------------------------------------------------------------------------- ablation tables

def _number(value) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def ablation_bar_chart(rows: List[Dict], metric: Union[str, Sequence[str]] = "AP", output_path: str = None,
                       title: Optional[str] = None, ylabel: Optional[str] = None) -> str:
    """Bar chart of an ablation table: one group of bars per row, labelled by its "name".

    Args:
        rows: e.g. [{"name": "fp32", "AP": 61.2, "AP50": 80.1}, {"name": "LSQ W4A4", "AP": 52.3}, ...].
        metric: the key to plot, or several keys (grouped bars, with a legend). Values that
            are missing or not finite numbers get no bar and an "n/a" mark. A row with a
            "seeds" list (per-seed rows holding the same keys) also gets each seed's value as a dot.
        output_path: the PNG to write (parent directories are created).
    Returns:
        output_path.
    """
    if output_path is None:
        raise ValueError("ablation_bar_chart needs output_path")
    if not rows:
        raise ValueError("ablation_bar_chart needs at least one row")
    missing = [i for i, r in enumerate(rows) if "name" not in r]
    if missing:
        raise ValueError(f"ablation rows need a 'name'; rows {missing} have none")
    metrics = [metric] if isinstance(metric, str) else list(metric)
    names = [str(r["name"]) for r in rows]
    width = 0.8 / len(metrics)
    fig, axes = new_figure(1, 1, (max(4.0, 0.9 * len(rows) * max(1.0, len(metrics) / 2) + 1.5), 3.5))
    ax = axes[0, 0]
    x = np.arange(len(rows))
    values_all = [v for r in rows for m in metrics if (v := _number(r.get(m))) is not None]
    top = max(values_all, default=1.0)
    for j, m in enumerate(metrics):
        offset = (j - (len(metrics) - 1) / 2) * width
        values = [_number(r.get(m)) for r in rows]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(x + offset, heights, width * 0.95, label=m)
        for bar, row in zip(bars, rows):
            seeds = [v for run in row.get("seeds", []) if (v := _number(run.get(m))) is not None]
            if len(seeds) > 1:
                center = bar.get_x() + bar.get_width() / 2
                ax.plot([center] * len(seeds), seeds, "o", color="black", markersize=3, zorder=3)
        for bar, v in zip(bars, values):
            text = f"{v:.1f}" if v is not None else "n/a"
            ax.text(bar.get_x() + bar.get_width() / 2, (v if v is not None and v > 0 else 0) + 0.01 * top,
                    text, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=20 if max(len(n) for n in names) > 10 else 0, ha="right"
                       if max(len(n) for n in names) > 10 else "center", fontsize=8)
    ax.set_ylabel(ylabel or (metrics[0] if len(metrics) == 1 else "value"))
    bottom = min(0.0, min(values_all, default=0.0) * 1.15)
    ax.set_ylim(bottom, top * 1.15 if top > 0 else 1.0)
    ax.axhline(0.0, color="black", linewidth=0.6)
    if len(metrics) > 1:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, output_path)
