#!/usr/bin/env bash
# The DETR shapes evidence of issue 24, end to end; every step resumes (run it again after an interruption).
#   1. stage one: the fine-tuning schedule, with the unquantized control held within 0.5 AP of the teacher;
#   2. stage two: each method's own knobs and its interpolation alpha, on that schedule (budget 8: every
#      point of each method's space, auxiliary queries 4, distillation 2, AQ-DETR their 8 combinations);
#      both on shapes_holdout only; the picks become configs/shapes/picked/*.yaml;
#   3. the grid: every row, three seeds, at W4A4A4, W3A3A3 and W2A2A2, on shapes_val (evaluated once).
# The control (the teacher fine-tuned unquantized) does not depend on the precision: the W3A3A3 and
# W2A2A2 grids take the W4A4A4 grid's control rows (--control-from) instead of training them again.
# JOBS fine-tunes run at once (default 2, one core each on this 2-core machine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
JOBS=${JOBS:-2}
PRECISIONS=(w4a4 w3a3 w2a2)
SCHEDULE=docs/experiments/detr_schedule_sweep_w4a4
METHODS=docs/experiments/detr_methods_sweep_w4a4
PICK=(--write-configs configs/shapes/picked --config-precisions "${PRECISIONS[@]}")

python tools/sweep.py --space tools/sweep_spaces/detr_schedule.yaml --precision w4a4 --variants lsq --control fp \
    --budget 8 --iters 1000 --jobs "$JOBS" --resume --output output/sweep_schedule --results "$SCHEDULE" "${PICK[@]}"
python tools/sweep.py --space tools/sweep_spaces/detr_methods.yaml --precision w4a4 --variants lsq aux distill aq \
    --budget 8 --iters 1000 --alphas 0.5 0.75 1.0 --schedule-from "$SCHEDULE/sweep.json" --jobs "$JOBS" --resume \
    --output output/sweep_methods_w4a4 --results "$METHODS" "${PICK[@]}"
for P in "${PRECISIONS[@]}"; do
    CONTROL=(--variants fp lsq aux distill aq)
    if [ "$P" != w4a4 ]; then
        CONTROL=(--variants lsq aux distill aq --control-from output/grid_w4a4/results.json)
    fi
    python tools/quickstart.py --precision "$P" "${CONTROL[@]}" --seeds 1 2 3 --jobs "$JOBS" \
        --resume --interpolate-from "$METHODS/sweep.json" --output "output/grid_$P"
done
