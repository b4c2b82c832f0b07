"""AQ-DETR training end to end: quantized student + auxiliary queries + distillation from a frozen teacher."""
import json
import os
import subprocess
import sys

import pytest
import torch

from train_net_helpers import COMMON, SMALL_VAL, STUDENTS, TINY, student_cfg, write_teacher

from detectron2.engine import default_argument_parser

from aqdetr_d2.engine import AQDETRTrainer

@pytest.mark.parametrize("config", ["detr_fp32.yaml", "deformable_detr_fp32.yaml"])
def test_teacher_stays_frozen_and_out_of_checkpoints(train_net, make_cfg, project_root, tmp_path, config):
    _, teacher_weights, opts = write_teacher(train_net, config, tmp_path, project_root)
    cfg = student_cfg(make_cfg, config, [*opts, "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(tmp_path / "student"),
                                          "DATASETS.TEST", f"('{SMALL_VAL}',)"])
    trainer = AQDETRTrainer(cfg)
    trainer.resume_or_load(resume=False)
    teacher = trainer.model.distiller.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    results = trainer.train()
    storage_keys = set(trainer.storage.histories())
    assert {"loss_distill_enc_attn", "loss_distill_dec_hidden", "loss_ce_aux", "loss_ce"} <= storage_keys
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not {id(p) for p in teacher.parameters()} & {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}

    saved = torch.load(tmp_path / "student" / "model_final.pth", map_location="cpu", weights_only=True)["model"]
    assert not any("teacher" in k or k.startswith("distiller") for k in saved)
    teacher_keys = set(torch.load(teacher_weights, map_location="cpu", weights_only=True)["model"])
    assert set(saved) - teacher_keys  # quantizer state and auxiliary queries were added

    # --eval-only with the student's own config needs no teacher (its weights may be gone),
    # and reproduces the final evaluation exactly.
    args = default_argument_parser().parse_args([
        "--config-file", os.path.join(project_root, "configs", "shapes", STUDENTS[config]), "--eval-only",
        *COMMON, *TINY[config], *opts, "MODEL.WEIGHTS", str(tmp_path / "student" / "model_final.pth"),
        "MODEL.DISTILL.TEACHER_WEIGHTS", str(tmp_path / "deleted.pth"), "OUTPUT_DIR", str(tmp_path / "eval"),
        "DATASETS.TEST", f"('{SMALL_VAL}',)"])
    evaluated = train_net.main(args)
    with open(tmp_path / "student" / "inference" / SMALL_VAL / "coco_instances_results.json") as f:
        trained_predictions = json.load(f)
    with open(tmp_path / "eval" / "inference" / SMALL_VAL / "coco_instances_results.json") as f:
        assert json.load(f) == trained_predictions
    assert evaluated["bbox"]["AP"] == results["bbox"]["AP"]


def test_two_process_ddp_distillation_keeps_quantizers_and_average_in_sync(train_net, project_root, tmp_path):
    config = "detr_fp32.yaml"
    _, _, opts = write_teacher(train_net, config, tmp_path, project_root)
    script = os.path.join(project_root, "tests", "engine", "ddp_distill_check.py")
    args = [os.path.join(project_root, "configs", "shapes", STUDENTS[config]), str(tmp_path / "result.json"),
            *COMMON, *TINY[config], *opts, "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()",
            "MODEL_EMA.ENABLED", "True", "MODEL_EMA.DECAY", "0.5", "SEED", "7",
            "OUTPUT_DIR", str(tmp_path / "ddp")]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "result.json") as f:
        result = json.load(f)
    assert result["world_size"] == 2
    assert result["ddp_wrapped"] and not result["teacher_in_ddp"]
    assert result["num_quantizers"] > 50
    assert result["max_scale_difference_across_ranks"] == 0.0
    assert result["max_param_difference_across_ranks"] == 0.0
    assert result["max_ema_difference_across_ranks"] == 0.0 and result["ema_differs_from_weights"]
    assert result["iterations"] == 2

    # Resumed to 4 iterations: the ranks stay in sync, and the run equals 4 uninterrupted iterations.
    for out, flags in (("ddp", ["--resume"]), ("straight", [])):
        longer = [a if a != str(tmp_path / "ddp") else str(tmp_path / out) for a in args]
        proc = subprocess.run([sys.executable, script, longer[0], str(tmp_path / f"{out}.json"), *flags, *longer[2:],
                               "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        with open(tmp_path / f"{out}.json") as f:
            result = json.load(f)
        assert result["iterations"] == 4 and result["max_scale_difference_across_ranks"] == 0.0
        assert result["max_param_difference_across_ranks"] == 0.0 and result["max_ema_difference_across_ranks"] == 0.0
    resumed, straight = (torch.load(tmp_path / d / "model_final.pth", map_location="cpu", weights_only=True)
                         for d in ("ddp", "straight"))
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
