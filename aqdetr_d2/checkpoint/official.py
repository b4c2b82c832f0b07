"""Rename facebookresearch/detr and fundamentalvision/Deformable-DETR state dicts to ours.

Transformer and head names already match (our modules mirror the official ones), so the
conversion is: torchvision ResNet -> Detectron2 ResNet names, packed attention in-projections
split into q/k/v, an optional `detector.` prefix for Deformable-DETR, and optionally COCO's
91 sparse category ids reduced to Detectron2's 80 contiguous classes.
"""
import re
from typing import Dict, List, Optional

import torch
from torch import Tensor

from ..errors import UserInputError

ARCHS = ("detr", "deformable_detr")


class ConversionError(UserInputError, ValueError):
    """An official checkpoint that does not fit the requested conversion."""


def _rename_backbone_key(key: str) -> Optional[str]:
    """'layer1.0.bn2.weight' (torchvision) -> 'res2.0.conv2.norm.weight' (Detectron2)."""
    if key.endswith("num_batches_tracked"):
        return None
    m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", key)
    if m is None:
        if key == "conv1.weight":
            return "stem.conv1.weight"
        if key.startswith("bn1."):
            return "stem.conv1.norm." + key[4:]
        raise KeyError(f"unexpected backbone key '{key}'")
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    prefix = f"res{stage}.{block}."
    rest = re.sub(r"^conv(\d)\.weight$", r"conv\1.weight", rest)
    rest = re.sub(r"^bn(\d)\.(.*)$", r"conv\1.norm.\2", rest)
    rest = re.sub(r"^downsample\.0\.weight$", "shortcut.weight", rest)
    rest = re.sub(r"^downsample\.1\.(.*)$", r"shortcut.norm.\1", rest)
    return prefix + rest


def _split_in_proj(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        m = re.match(r"^(.*)\.in_proj_(weight|bias)$", key)
        if m is None:
            out[key] = value
            continue
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
            out[f"{m.group(1)}.{proj}.{m.group(2)}"] = part.clone()
    return out


def _coco_contiguous_rows(with_no_object: bool) -> Tensor:
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    ids = [c["id"] for c in COCO_CATEGORIES if c["isthing"]]
    return torch.as_tensor(ids + ([91] if with_no_object else []))


def convert_official_state_dict(state: Dict[str, Tensor], arch: str, coco_to_contiguous: str = "auto",
                                report: Optional[List[str]] = None) -> Dict[str, Tensor]:
    """
    Args:
        state: the official model state dict (`checkpoint["model"]`).
        arch: "detr" or "deformable_detr".
        coco_to_contiguous: "yes" keeps only the class rows of COCO's 80 thing ids (in
            Detectron2's contiguous order), "no" keeps rows as they are, "auto" does it when
            the class head has COCO's size (92 rows for DETR, 91 for Deformable-DETR).
    Returns:
        a state dict for `AQDETR` / `AQDeformableDETR`; `report`, when given, receives one line per
        class-head change.
    """
    if arch not in ARCHS:
        raise ConversionError(f"arch must be one of {ARCHS}, got '{arch}'")
    if coco_to_contiguous not in ("auto", "yes", "no"):
        raise ConversionError(f"coco_to_contiguous must be auto/yes/no, got '{coco_to_contiguous}'")
    if not any(k.startswith("backbone.0.body.") for k in state):
        raise ConversionError("not an official DETR / Deformable-DETR state dict: no 'backbone.0.body.*' keys")
    deformable = any("sampling_offsets" in k for k in state)
    if deformable != (arch == "deformable_detr"):
        found = "deformable_detr" if deformable else "detr"
        raise ConversionError(f"this is a {found} checkpoint ({'it has' if deformable else 'no'} deformable attention "
                         f"'sampling_offsets'), not {arch}: convert it with --arch {found}")
    head_prefix = "" if arch == "detr" else "detector."
    out = {}
    for key, value in _split_in_proj(state).items():
        if key.startswith("backbone.0.body."):
            new = _rename_backbone_key(key[len("backbone.0.body."):])
            if new is not None:
                out["backbone." + new] = value
        else:
            out[head_prefix + key] = value

    with_no_object = arch == "detr"
    coco_rows = 92 if with_no_object else 91
    class_keys = [k for k in out if re.search(r"class_embed(\.\d+)?\.(weight|bias)$", k)]
    rows = out[class_keys[0]].shape[0] if class_keys else None
    if coco_to_contiguous == "yes" or (coco_to_contiguous == "auto" and rows == coco_rows):
        if rows != coco_rows:
            raise ConversionError(f"class head has {rows} rows, COCO's official head has {coco_rows}")
        keep = _coco_contiguous_rows(with_no_object)
        proposal_keys = _proposal_head_keys(out, class_keys)
        # The two-stage proposal head scores objectness in its row 0 (top-k selection and the
        # encoder loss read it), which no COCO class owns: that row stays first.
        proposal_keep = torch.cat([torch.zeros(1, dtype=keep.dtype), keep[1:]])
        for k in class_keys:
            out[k] = out[k][proposal_keep if k in proposal_keys else keep].clone()
        if report is not None:
            report.append(f"class rows of {len(class_keys) - len(proposal_keys)} class-head tensors: COCO's {coco_rows} "
                          f"-> Detectron2's {len(keep)} (e.g. {sorted(set(class_keys) - proposal_keys)[:2]})")
            if proposal_keys:
                report.append(f"two-stage proposal head {sorted(proposal_keys)}: objectness row 0 kept first")
    return out


def _proposal_head_keys(out: Dict[str, Tensor], class_keys):
    """The class-head tensors of a two-stage model's encoder proposals: the last of the per-layer
    heads (index = decoder layers), under both of its names; none for one-stage models."""
    if not any(k.endswith("transformer.enc_output.weight") for k in out):
        return set()
    index = max(int(re.search(r"class_embed\.(\d+)\.", k).group(1)) for k in class_keys if re.search(r"\.\d+\.", k))
    proposal = {k for k in class_keys if f"class_embed.{index}." in k}
    first = {k.replace(f"class_embed.{index}.", "class_embed.0.") for k in proposal}
    if any(torch.equal(out[p], out[f]) for p, f in zip(sorted(proposal), sorted(first)) if f in out):
        raise ConversionError("two-stage without box refinement shares one class head between the proposals' objectness "
                         "(row 0) and the classes, so its rows cannot be remapped; convert with "
                         "--coco-to-contiguous no")
    return proposal
