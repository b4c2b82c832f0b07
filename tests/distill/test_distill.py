"""Layer-by-layer distillation: zero for identical models, positive and differentiable once quantized."""
import os

import pytest
import torch
import yaml

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from aqdetr_d2.distill import build_distiller
from aqdetr_d2.distill import distiller as distiller_module
from aqdetr_d2.quant import LSQQuantizer
from detection_targets import training_batch

# name -> (config, config node, extra overrides). The shapes DETR is two-stage with anchor boxes.
ARCHS = {
    "detr": ("shapes/detr_fp32.yaml", "DETR", {}),
    "detr_anchors": ("shapes/detr_fp32.yaml", "DETR", {"MODEL.DETR.TWO_STAGE": False}),
    "detr_plain": ("shapes/detr_fp32.yaml", "DETR", {"MODEL.DETR.TWO_STAGE": False, "MODEL.DETR.BOX_REFINE": False,
                                                     "MODEL.DETR.FOCAL_LOSS": False, "MODEL.DETR.SPATIAL_PRIOR": False}),
    "deformable": ("shapes/deformable_detr_fp32.yaml", "DEFORMABLE_DETR", {}),
}
ALL_ARCHS = list(ARCHS)
TERMS = {"loss_distill_enc_attn", "loss_distill_enc_out", "loss_distill_dec_hidden", "loss_distill_dec_cls",
         "loss_distill_dec_box"}


def _tiny(node):
    return {f"MODEL.{node}.HIDDEN_DIM": 32, f"MODEL.{node}.DIM_FEEDFORWARD": 64, f"MODEL.{node}.NHEADS": 4,
            f"MODEL.{node}.ENC_LAYERS": 2, f"MODEL.{node}.DEC_LAYERS": 2, "MODEL.RESNETS.NORM": "FrozenBN"}


def _opts(d):
    return [x for k, v in d.items() for x in (k, str(v))]


@pytest.fixture
def teacher_files(tmp_path, make_cfg, project_root):
    """Per architecture: (teacher yaml, teacher checkpoint) of a tiny random float model."""
    def make(arch, *extra):
        config, node, arch_opts = ARCHS[arch]
        overrides = {**_tiny(node), **arch_opts, **dict(zip(extra[::2], extra[1::2]))}
        yaml_path = tmp_path / f"teacher_{arch}.yaml"
        yaml_path.write_text(_nested_yaml(overrides, os.path.join(project_root, "configs", config)))
        teacher = build_model(make_cfg(config, *_opts(overrides)))
        with torch.no_grad():
            # Zero-initialised box-head layers would make every box term vanish trivially.
            for p in teacher.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0, 0.05)
        DetectionCheckpointer(teacher, str(tmp_path)).save(f"teacher_{arch}")
        return str(yaml_path), str(tmp_path / f"teacher_{arch}.pth"), overrides, teacher
    return make


def _nested_yaml(overrides, base):
    """A config file: `_BASE_` plus dotted KEY VALUE overrides as nested YAML."""
    tree = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return yaml.safe_dump({"_BASE_": base, **tree})


def _student(make_cfg, arch, yaml, weights, *extra, overrides=None):
    config, node, arch_opts = ARCHS[arch]
    cfg = make_cfg(config, *_opts(overrides or {**_tiny(node), **arch_opts}), "MODEL.DISTILL.ENABLED", "True",
                   "MODEL.DISTILL.TEACHER_CONFIG", yaml,
                   "MODEL.DISTILL.TEACHER_WEIGHTS", weights, *extra)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    model.distiller = build_distiller(cfg)
    return cfg, model


def _batch(gen, n=2):
    return training_batch(gen, [(96, 128), (112, 80)][:n], [[10.0, 12.0, 50.0, 60.0], [30.0, 5.0, 70.0, 40.0]], [1, 3])


def _parallel_safe(arch, mode):
    # Two-stage teacher and student select different proposals: parallel mode cannot pair them.
    return (f"MODEL.{ARCHS[arch][1]}.TWO_STAGE", False) if mode == "parallel" else ()


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("mode", ["teacher_forced", "parallel"])
def test_terms_vanish_for_identical_float_models(make_cfg, teacher_files, arch, mode):
    yaml, weights, overrides, _ = teacher_files(arch, *_parallel_safe(arch, mode))
    _, student = _student(make_cfg, arch, yaml, weights, "MODEL.DISTILL.MODE", mode, overrides=overrides)
    student.train()
    losses = student(_batch(torch.Generator().manual_seed(0)))
    distill = {k: v for k, v in losses.items() if k.startswith("loss_distill")}
    assert set(distill) == TERMS
    for name, value in distill.items():
        assert value.abs().item() < 1e-5, f"{name} = {value.item()}"


@pytest.mark.parametrize("arch", ALL_ARCHS)
@pytest.mark.parametrize("mode", ["teacher_forced", "parallel"])
def test_terms_are_positive_and_reach_step_sizes_when_quantized(make_cfg, teacher_files, arch, mode):
    yaml, weights, overrides, _ = teacher_files(arch, *_parallel_safe(arch, mode))
    _, student = _student(make_cfg, arch, yaml, weights, "MODEL.DISTILL.MODE", mode, "MODEL.QUANT.ENABLED", "True",
                          "MODEL.QUANT.WEIGHT_BITS", "2", "MODEL.QUANT.ACT_BITS", "2", "MODEL.QUANT.ATTN_BITS", "2",
                          overrides=overrides)
    teacher_state = {k: v.clone() for k, v in student.distiller.teacher.state_dict().items()}
    student.train()
    losses = student(_batch(torch.Generator().manual_seed(1)))
    for name in TERMS:
        assert losses[name].item() > 0, name
        assert losses[name].requires_grad, name
    sum(losses[k] for k in TERMS).backward()
    steps = [m.scale for m in student.modules() if isinstance(m, LSQQuantizer) and m.enabled]
    assert sum(int(s.grad is not None and s.grad.abs().sum() > 0) for s in steps) > len(steps) // 2
    # The teacher is frozen and invisible to the student's state and parameters.
    assert all(not p.requires_grad and p.grad is None for p in student.distiller.teacher.parameters())
    assert not any(k.startswith("distiller") for k in student.state_dict())
    assert {id(p) for p in student.parameters()}.isdisjoint({id(p) for p in student.distiller.teacher.parameters()})
    for k, v in student.distiller.teacher.state_dict().items():
        assert torch.equal(v, teacher_state[k]), k


@pytest.mark.parametrize("arch", ["detr", "deformable"])
def test_terms_of_weight_zero_are_skipped_and_change_nothing(make_cfg, teacher_files, monkeypatch, arch):
    # The reference computes every term and drops two; the run with their weights at 0 must not
    # compute them at all, and give the same other terms and gradients, bit for bit.
    yaml, weights, overrides, _ = teacher_files(arch)
    _, student = _student(make_cfg, arch, yaml, weights, "MODEL.QUANT.ENABLED", "True", overrides=overrides)
    student.train()
    batch = _batch(torch.Generator().manual_seed(3))
    with torch.no_grad():
        student(batch)  # step-size initialisation, so that both runs below start from the same state
    dropped = {"loss_distill_enc_attn", "loss_distill_dec_cls"}

    def step():
        student.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        losses = student(batch)
        sum(v for k, v in losses.items() if k not in dropped).backward()
        return ({k: v.detach() for k, v in losses.items() if k not in dropped},
                {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})

    reference_losses, reference_grads = step()
    calls = []
    kind = student.distiller.adapter.attention_kind
    kl = distiller_module.ATTENTION_KL[kind]
    monkeypatch.setitem(distiller_module.ATTENTION_KL, kind, lambda *a: calls.append(1) or kl(*a))
    class_kl = {name: f for name, f in distiller_module.CLASS_KL.items()}
    for name, f in class_kl.items():
        monkeypatch.setitem(distiller_module.CLASS_KL, name, lambda *a, f=f: calls.append(1) or f(*a))
    student.distiller.weights.update(dict.fromkeys(dropped, 0.0))
    losses, grads = step()
    assert not calls and dropped.isdisjoint(losses)
    assert losses.keys() == reference_losses.keys() and grads.keys() == reference_grads.keys()
    for k, v in losses.items():
        assert torch.equal(v, reference_losses[k]), k
    for n, g in grads.items():
        assert torch.equal(g, reference_grads[n]), n


def _grad_norm(loss, params):
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return sum(float(g.pow(2).sum()) for g in grads if g is not None) ** 0.5


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_attention_kl_gradient_is_bounded_at_low_bit(make_cfg, teacher_files, arch):
    # 2-bit attention maps are mostly exact zeros: a KL to them would be unbounded and its
    # straight-through gradient ~1/eps, which full-model gradient clipping turns into a step
    # that ignores the detection loss. The KL must stay on the detection loss's scale.
    yaml, weights, overrides, _ = teacher_files(arch)
    _, student = _student(make_cfg, arch, yaml, weights, "MODEL.QUANT.ENABLED", "True",
                          "MODEL.QUANT.WEIGHT_BITS", "2", "MODEL.QUANT.ACT_BITS", "2", "MODEL.QUANT.ATTN_BITS", "2",
                          overrides=overrides)
    student.train()
    losses = student(_batch(torch.Generator().manual_seed(2)))
    params = [p for p in student.parameters() if p.requires_grad]
    detection = _grad_norm(sum(v for k, v in losses.items() if not k.startswith("loss_distill")), params)
    attention = _grad_norm(losses["loss_distill_enc_attn"], params)
    assert 0 < attention < 10 * detection, (attention, detection)


def test_foreground_only_uses_matched_queries(make_cfg, teacher_files):
    yaml, weights, _, _ = teacher_files("detr")
    _, student = _student(make_cfg, "detr", yaml, weights, "MODEL.QUANT.ENABLED", "True",
                          "MODEL.DISTILL.FOREGROUND_ONLY", "True")
    student.train()
    batch = _batch(torch.Generator().manual_seed(2))
    fg = student(batch)
    student.distiller.foreground_only = False
    everything = student(batch)
    assert fg["loss_distill_dec_hidden"].item() != pytest.approx(everything["loss_distill_dec_hidden"].item())
    assert fg["loss_distill_enc_attn"].item() == pytest.approx(everything["loss_distill_enc_attn"].item())


@pytest.mark.parametrize("arch", ["detr", "deformable"])
def test_parallel_mode_refuses_two_stage_decoder(make_cfg, teacher_files, arch):
    yaml, weights, overrides, _ = teacher_files(arch)
    _, student = _student(make_cfg, arch, yaml, weights, "MODEL.DISTILL.MODE", "parallel", overrides=overrides)
    student.train()
    with pytest.raises(ValueError, match="two-stage"):
        student(_batch(torch.Generator().manual_seed(3)))


def test_missing_teacher_weights_is_a_clear_error(make_cfg, teacher_files):
    yaml, _, _, _ = teacher_files("detr")
    with pytest.raises(ValueError, match="TEACHER_WEIGHTS"):
        _student(make_cfg, "detr", yaml, "")


def test_teacher_of_another_architecture_is_rejected(make_cfg, teacher_files):
    yaml, weights, _, _ = teacher_files("deformable")
    config, node, _ = ARCHS["detr"]
    cfg = make_cfg(config, *_opts(_tiny(node)), "MODEL.DISTILL.ENABLED", "True",
                   "MODEL.DISTILL.TEACHER_CONFIG", yaml, "MODEL.DISTILL.TEACHER_WEIGHTS", weights)
    with pytest.raises(ValueError, match="does not match the student"):
        build_distiller(cfg)


def test_teacher_of_another_size_is_rejected(make_cfg, teacher_files):
    yaml, weights, _, _ = teacher_files("detr")
    config, node, _ = ARCHS["detr"]
    cfg = make_cfg(config, *_opts(_tiny(node)), "MODEL.DETR.DEC_LAYERS", "3", "MODEL.DISTILL.ENABLED", "True",
                   "MODEL.DISTILL.TEACHER_CONFIG", yaml, "MODEL.DISTILL.TEACHER_WEIGHTS", weights)
    with pytest.raises(ValueError, match="DEC_LAYERS: student 3 vs teacher 2"):
        build_distiller(cfg)


def test_unknown_mode_is_rejected(make_cfg, teacher_files):
    yaml, weights, _, _ = teacher_files("detr")
    with pytest.raises(ValueError, match="MODEL.DISTILL.MODE"):
        _student(make_cfg, "detr", yaml, weights, "MODEL.DISTILL.MODE", "sideways")
