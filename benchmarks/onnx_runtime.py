"""ONNX Runtime latency and file size of the float and the quantized (W4A4A4) exports.

Random weights: latency and size do not depend on their values, only the quantizers' step
sizes must exist, so they are calibrated on two random images of the benchmark's size. Each
model runs at batch 1 in a session with onnxruntime's default threads (this machine's cores).
"""
import os

import torch

from detectron2.modeling import build_model

from aqdetr_d2.config import load_config
from aqdetr_d2.deploy import export_onnx
from aqdetr_d2.deploy.runtime import session_latencies
from aqdetr_d2.quant import calibrate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (float config, W4A4A4 config, image (H, W)); the shapes models at their test size,
# the R50 models at COCO's, where the convolutions and the encoder bound the time as in real use.
MODELS = {
    "DETR (shapes)": ("configs/shapes/detr_fp32.yaml", "configs/shapes/detr_lsq_w4a4.yaml", (128, 170)),
    "Deformable-DETR (shapes)": ("configs/shapes/deformable_detr_fp32.yaml",
                                 "configs/shapes/deformable_detr_lsq_w4a4.yaml", (128, 170)),
    "DETR-R50": ("configs/coco/detr_r50_fp32.yaml", "configs/coco/detr_r50_lsq_w4a4.yaml", (800, 1333)),
    "Deformable-DETR-R50": ("configs/coco/deformable_detr_r50_fp32.yaml",
                            "configs/coco/deformable_detr_r50_lsq_w4a4.yaml", (800, 1333)),
}


def _model(config: str, size):
    cfg = load_config(os.path.join(ROOT, config), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    model = build_model(cfg).eval()
    if cfg.MODEL.QUANT.ENABLED:
        g = torch.Generator().manual_seed(0)
        calibrate(model, [[{"image": torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8)}]
                          for _ in range(2)])
    return model


def bench_onnx(workdir: str, repeats: int, models=MODELS):
    """[{model, format: "float" | "quantized", latency_s, file_mb, image}] for every model."""
    rows = []
    for name, (float_config, quant_config, size) in models.items():
        image = torch.rand(1, 3, *size) * 255
        paths = {}
        for fmt, config in (("float", float_config), ("quantized", quant_config)):
            torch.manual_seed(0)
            paths[fmt] = os.path.join(workdir, f"{name}_{fmt}.onnx".replace(" ", "_"))
            export_onnx(_model(config, size), paths[fmt], image)
        # Both files take turns in one measurement, so that their ratio is of the same load.
        for (fmt, path), latency in zip(paths.items(), session_latencies(list(paths.values()), image.numpy(), repeats)):
            rows.append({"model": name, "format": fmt, "image": list(size), "latency_s": latency,
                         "file_mb": os.path.getsize(path) / 2**20})
    return rows


def onnx_markdown(rows) -> str:
    lines = ["| ONNX Runtime, batch 1 | image | float s | W4A4A4 s | latency vs float | float MB | W4A4A4 MB | size vs float |",
             "|---|---|---|---|---|---|---|---|"]
    by_model = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["format"]] = r
    for name, r in by_model.items():
        f, q = r["float"], r["quantized"]
        lines.append(f"| {name} | {f['image'][0]}x{f['image'][1]} | {f['latency_s']:.3f} | {q['latency_s']:.3f} | "
                     f"{q['latency_s'] / f['latency_s']:.2f}x | {f['file_mb']:.1f} | {q['file_mb']:.1f} | "
                     f"{q['file_mb'] / f['file_mb']:.3f}x |")
    return "\n".join(lines)
