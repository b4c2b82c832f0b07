#!/usr/bin/env bash
# onnxruntime AP against train_net.py --eval-only on the same weights, shapes_val (1000 images).
# The weights: each committed shapes teacher with its quantizers calibrated (post-training, SEED 1),
# saved once as a packed export, which both paths then read. Logs land beside this script.
set -euo pipefail
B="MODEL.BACKBONE.NAME build_narrow_resnet_backbone MODEL.RESNETS.STEM_OUT_CHANNELS 32 MODEL.RESNETS.RES2_OUT_CHANNELS 32"
OUT=${OUT:-output/deploy_check}
DOCS=docs/deploy
for arch in detr deformable_detr; do
  teacher=docs/quickstart/${arch%_detr}_teacher.pth
  for p in w4a4 w2a2; do
    cfg=configs/shapes/${arch}_lsq_$p.yaml
    run=$OUT/${arch}_$p
    mkdir -p $run
    python tools/export_quantized.py --config-file $cfg --output $run/packed.pth $B MODEL.WEIGHTS $teacher SEED 1 > $run/export.log 2>&1
    python tools/export_onnx.py --config-file $cfg --output $run/model.onnx $B MODEL.WEIGHTS $run/packed.pth 2>&1 \
        | grep "^#\|^onnx\|^integer\|^float k" > $DOCS/${arch}_${p}_export_onnx.log
    python tools/eval_onnx.py --config-file $cfg --onnx $run/model.onnx $B OUTPUT_DIR $run/ort 2>&1 | grep "copypaste" > $DOCS/${arch}_${p}_onnxruntime.log
    python projects/AQDETR/train_net.py --config-file $cfg --eval-only $B MODEL.WEIGHTS $run/packed.pth OUTPUT_DIR $run/torch 2>&1 | grep "copypaste" > $DOCS/${arch}_${p}_eval_only.log
    # The same with the convolutions' int32 bias, as a model trained with MODEL.QUANT.INTEGER_BIAS evaluates.
    python projects/AQDETR/train_net.py --config-file $cfg --eval-only $B MODEL.WEIGHTS $run/packed.pth OUTPUT_DIR $run/torch_integer_bias \
        MODEL.QUANT.INTEGER_BIAS True 2>&1 | grep "copypaste" > $DOCS/${arch}_${p}_eval_only_integer_bias.log
  done
done
# The table, from the logs above (docs/deploy/agreement.md).
python - <<'PY'
import re
rows = ["| model | weights | `--eval-only` AP | onnxruntime AP | difference | `--eval-only`, `INTEGER_BIAS True` | difference |",
        "|---|---|---|---|---|---|---|"]
for arch in ("detr", "deformable_detr"):
    for p in ("w4a4", "w2a2"):
        ap = [float(re.search(r"copypaste: ([\d.]+),", open(f"docs/deploy/{arch}_{p}_{kind}.log").read()).group(1))
              for kind in ("eval_only", "onnxruntime", "eval_only_integer_bias")]
        rows.append(f"| {arch} {p.upper()} | committed teacher, step sizes calibrated (SEED 1) | {ap[0]:.2f} | "
                    f"{ap[1]:.2f} | {ap[1] - ap[0]:+.2f} | {ap[2]:.2f} | {ap[1] - ap[2]:+.2f} |")
open("docs/deploy/agreement.md", "w").write("\n".join(rows) + "\n")
PY
