"""Pictures: detections beside ground truth, attention maps and sampling points (charts: charts.py).

Everything draws on `matplotlib.figure.Figure` objects with an explicit Agg canvas, never
through `pyplot`: no GUI backend is touched, no global figure state is kept, and callers
(tools/visualize.py, the quickstart) need no display. A saved PNG is `figsize x dpi` pixels
exactly (no tight bounding box), so its size follows from the layout.

Boxes and labels are drawn with Detectron2's `Visualizer` and the dataset's `MetadataCatalog`
entry. Model internals come from what `predict(images)` returns (see
`aqdetr_d2.modeling.meta_arch`), except the deformable sampling locations, which the model
does not return: `capture_deformable_sampling` records them with forward hooks.
"""
import math
import os
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor, nn

__all__ = [
    "capture_deformable_sampling",
    "describe_precision",
    "detr_cross_attention_map",
    "detr_encoder_attention_map",
    "draw_detections",
    "draw_ground_truth",
    "draw_heatmap_panel",
    "draw_sampling_panel",
    "feature_shape",
    "new_figure",
    "save_figure",
    "save_image_grid",
    "top_queries",
]

# Panel colours: teacher (float) and student (quantized); one colour per feature level.
TEACHER_COLOR = "tab:blue"
STUDENT_COLOR = "tab:orange"
LEVEL_COLORS = ("tab:red", "tab:green", "tab:blue", "tab:purple", "tab:orange", "tab:cyan")


# --------------------------------------------------------------------------- figures

def new_figure(nrows: int, ncols: int, panel_size: Tuple[float, float] = (3.0, 3.0), dpi: int = 100):
    """A Figure on an Agg canvas and its (nrows, ncols) array of axes."""
    fig = Figure(figsize=(ncols * panel_size[0], nrows * panel_size[1]), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig: Figure, output_path: str) -> str:
    """Lay out and write `fig` as a PNG (parent directories created); returns the path."""
    parent = os.path.dirname(os.path.abspath(output_path))
    os.makedirs(parent, exist_ok=True)
    fig.tight_layout()
    fig.savefig(output_path, format="png", dpi=fig.dpi, facecolor="white")
    return output_path


def save_image_grid(panels: Sequence[Sequence[np.ndarray]], output_path: str,
                    row_titles: Optional[Sequence[str]] = None, col_titles: Optional[Sequence[str]] = None,
                    panel_inches: float = 3.0, dpi: int = 100, title: Optional[str] = None) -> str:
    """Write a grid of RGB images (rows x columns, each (H, W, 3) uint8) as one PNG."""
    nrows, ncols = len(panels), max(len(r) for r in panels)
    fig, axes = new_figure(nrows, ncols, (panel_inches, panel_inches), dpi)
    for r in range(nrows):
        for c in range(ncols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(panels[r]):
                ax.imshow(panels[r][c])
            if r == 0 and col_titles:
                ax.set_title(col_titles[c], fontsize=10)
            if c == 0 and row_titles:
                ax.text(-0.04, 0.5, row_titles[r], transform=ax.transAxes, rotation=90,
                        ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, output_path)


def describe_precision(cfg) -> str:
    """"fp32" or e.g. "W4/A4/Attn4 lsq" from `MODEL.QUANT`, for panel titles."""
    q = cfg.MODEL.QUANT
    if not q.ENABLED:
        return "fp32"
    return f"W{q.WEIGHT_BITS}/A{q.ACT_BITS}/Attn{q.ATTN_BITS} {q.QUANTIZER}"


# --------------------------------------------------------------------------- detections

def _visualizer_scale(image: np.ndarray, target: int = 384) -> float:
    # Visualizer's fonts are at least 10 px: small images (128 px shapes) are drawn enlarged.
    return max(1.0, target / max(image.shape[:2]))


def draw_detections(image_rgb: np.ndarray, instances, metadata, score_threshold: float = 0.3,
                    max_detections: int = 20, scale: Optional[float] = None) -> np.ndarray:
    """Predicted boxes (`Instances` with pred_boxes, scores, pred_classes, in the coordinates
    of `image_rgb`) scoring at least `score_threshold`, at most `max_detections` of the best,
    drawn by Detectron2's `Visualizer`. Returns the drawn (H', W', 3) uint8 image."""
    from detectron2.utils.visualizer import Visualizer

    instances = instances.to("cpu")
    instances = instances[instances.scores >= score_threshold]
    if len(instances) > max_detections:
        instances = instances[instances.scores.argsort(descending=True)[:max_detections]]
    vis = Visualizer(image_rgb, metadata, scale=scale or _visualizer_scale(image_rgb))
    return vis.draw_instance_predictions(instances).get_image()


def draw_ground_truth(image_rgb: np.ndarray, dataset_dict: Dict, metadata,
                      scale: Optional[float] = None) -> np.ndarray:
    """The annotations of a Detectron2 dataset dict (boxes and class names) on its image."""
    from detectron2.utils.visualizer import Visualizer

    vis = Visualizer(image_rgb, metadata, scale=scale or _visualizer_scale(image_rgb))
    return vis.draw_dataset_dict(dataset_dict).get_image()


# --------------------------------------------------------------------------- attention

def top_queries(logits: Tensor, k: int, sigmoid: bool) -> Tuple[List[int], List[float], List[int]]:
    """The `k` best queries of one image: logits (Q, K + 1) with a softmax no-object class
    (DETR) or (Q, K) with sigmoid scores (Deformable-DETR). Returns indices, scores, labels."""
    probs = logits.float().sigmoid() if sigmoid else logits.float().softmax(-1)[:, :-1]
    scores, labels = probs.max(-1)
    order = scores.argsort(descending=True)[:k]
    return order.tolist(), scores[order].tolist(), labels[order].tolist()


def feature_shape(num_positions: int, image_hw: Tuple[int, int], strides: Sequence[int] = (32, 16, 8, 64)
                  ) -> Tuple[int, int]:
    """(h, w) of the flattened feature map of an (H, W) image with `num_positions` cells.

    A ResNet stage of stride s gives ceil(H / s) x ceil(W / s); other factorizations
    (unusual backbones) fall back to the one closest to the image's aspect ratio.
    """
    height, width = image_hw
    for stride in strides:
        h, w = math.ceil(height / stride), math.ceil(width / stride)
        if h * w == num_positions:
            return h, w
    pairs = [(h, num_positions // h) for h in range(1, num_positions + 1) if num_positions % h == 0]
    return min(pairs, key=lambda hw: abs(math.log(hw[0] / hw[1]) - math.log(height / width)))


def detr_cross_attention_map(transformer_out: Dict, layer: int, query: int, hw: Tuple[int, int],
                             image_index: int = 0) -> np.ndarray:
    """DETR decoder cross-attention of one query, averaged over heads: (h, w) over the feature
    map, as probabilities before the attention quantizer.
    `transformer_out` is `predict(...)["states"].internals`, whose "dec_cross_attn" holds
    per decoder layer (B, H, Q, S)."""
    attn = transformer_out["dec_cross_attn"][layer][image_index, :, query]  # (H, S)
    return attn.float().mean(0).reshape(hw).cpu().numpy()


def detr_encoder_attention_map(transformer_out: Dict, layer: int, position: int, hw: Tuple[int, int],
                               image_index: int = 0) -> np.ndarray:
    """DETR encoder self-attention of one feature position (row-major index), averaged over
    heads: (h, w). "enc_attn" holds per encoder layer (B, H, S, S)."""
    attn = transformer_out["enc_attn"][layer][image_index, :, position]  # (H, S)
    return attn.float().mean(0).reshape(hw).cpu().numpy()


def _sampling_locations(module: nn.Module, offsets: Tensor, reference_points: Tensor,
                        spatial_shapes: Tensor) -> Tensor:
    """Sampling locations of `MSDeformAttn.forward`, from its offsets and reference points."""
    batch, len_q = reference_points.shape[:2]
    offsets = offsets.view(batch, len_q, module.n_heads, module.n_levels, module.n_points, 2)
    if reference_points.shape[-1] == 2:
        normalizer = spatial_shapes.flip(-1).to(reference_points.dtype)
        return reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    return (reference_points[:, :, None, :, None, :2]
            + offsets / module.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)


@contextmanager
def capture_deformable_sampling(model: nn.Module, part: str = "decoder") -> Iterator[List[Dict[str, Tensor]]]:
    """Record the sampling locations and attention weights of every deformable attention module
    of `part` ("decoder" or "encoder") during the forward passes run inside the block.

    Yields a list that receives, per module call in execution order (i.e. per layer for one
    forward pass), {"locations": (B, Lq, H, L, P, 2) normalized (x, y) over each level's
    padded map, "weights": (B, Lq, H, L, P)}. The locations are rebuilt from the module's
    `sampling_offsets` output and its reference points exactly as `MSDeformAttn.forward` does;
    the weights are those the module samples with (the output of `attn_weight_quant`, so a
    quantized student shows its low-bit weights). The hooks are removed on exit.
    """
    from ..layers.ms_deform_attn import MSDeformAttn

    modules = [m for name, m in model.named_modules()
               if isinstance(m, MSDeformAttn) and f".{part}." in f".{name}."]
    if not modules:
        raise ValueError(f"no MSDeformAttn module under a '{part}' in {type(model).__name__}")
    records: List[Dict[str, Tensor]] = []
    handles = []
    for module in modules:
        last = {}

        def offsets_hook(_mod, _inputs, output, last=last):
            last["offsets"] = output.detach()

        def weights_hook(_mod, _inputs, output, last=last):
            last["weights"] = output.detach()

        def attn_hook(mod, args, kwargs, output, last=last):
            names = ("query", "reference_points", "input_flatten", "input_spatial_shapes")
            values = dict(zip(names, args))
            values.update({k: v for k, v in kwargs.items() if k in names})
            locations = _sampling_locations(mod, last.pop("offsets"), values["reference_points"].detach(),
                                            values["input_spatial_shapes"])
            records.append({"locations": locations, "weights": last.pop("weights")})

        handles.append(module.sampling_offsets.register_forward_hook(offsets_hook))
        handles.append(module.attn_weight_quant.register_forward_hook(weights_hook))
        handles.append(module.register_forward_hook(attn_hook, with_kwargs=True))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _draw_box(ax, box_xyxy: Sequence[float], color: str = "white"):
    x0, y0, x1, y1 = box_xyxy
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=1.5))


def draw_heatmap_panel(ax, image_rgb: np.ndarray, heat: np.ndarray, title: str = "",
                       box_xyxy: Optional[Sequence[float]] = None, marker_xy: Optional[Sequence[float]] = None,
                       alpha: float = 0.55):
    """An attention map (h, w) upsampled (bilinear) over the whole image, normalized to its max."""
    height, width = image_rgb.shape[:2]
    ax.imshow(image_rgb)
    heat = np.asarray(heat, dtype=np.float32)
    heat = heat / heat.max() if heat.max() > 0 else heat
    ax.imshow(heat, cmap="jet", alpha=alpha, extent=(0, width, height, 0), interpolation="bilinear",
              vmin=0.0, vmax=1.0)
    if box_xyxy is not None:
        _draw_box(ax, box_xyxy)
    if marker_xy is not None:
        ax.plot([marker_xy[0]], [marker_xy[1]], marker="x", color="white", markersize=9, mew=2)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def draw_sampling_panel(ax, image_rgb: np.ndarray, locations: Tensor, weights: Tensor, title: str = "",
                        box_xyxy: Optional[Sequence[float]] = None, max_area: float = 400.0):
    """Deformable attention of one query: every (head, level, point) sampling location, given as
    (H, L, P, 2) normalized (x, y), drawn at its place in the image as a dot of area
    `max_area x weight` (attention weights (H, L, P), in [0, 1]; the same scale in every panel,
    so a float and a quantized model compare directly); one colour per feature level, the
    coarsest drawn first."""
    height, width = image_rgb.shape[:2]
    ax.imshow(image_rgb)
    locations, weights = locations.float().cpu(), weights.float().cpu()
    for lvl in reversed(range(locations.shape[1])):
        xy = locations[:, lvl].reshape(-1, 2).numpy()
        w = weights[:, lvl].reshape(-1).numpy()
        ax.scatter(xy[:, 0] * width, xy[:, 1] * height, s=np.maximum(w * max_area, 2.0),
                   c=LEVEL_COLORS[lvl % len(LEVEL_COLORS)], alpha=0.6, edgecolors="white", linewidths=0.3,
                   label=f"level {lvl}")
    if box_xyxy is not None:
        _draw_box(ax, box_xyxy)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_title(title, fontsize=8)
    ax.axis("off")
