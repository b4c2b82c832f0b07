"""Per-architecture access to the layers a distiller compares.

An adapter turns one training forward of the student (and, in parallel mode, one of the
teacher) into per-layer pairs of student / teacher tensors. In teacher-forced mode each
teacher layer is run on the student's input to that layer, so a pair measures only that
layer's quantization error; in parallel mode the whole teacher runs on the image.
Only object queries are compared: the student's outputs hold no auxiliary queries (the
meta-architecture splits them off into "aux_query_outputs"). Teacher layers are run under
`torch.no_grad()` on detached student tensors.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor


@dataclass
class EncoderPair:
    """One encoder layer: attention (DETR (B, H, S, S); Deformable (B, S, H, L, P)) and output (B, S, C)."""

    student_attn: Tensor
    teacher_attn: Tensor
    student_out: Tensor
    teacher_out: Tensor
    valid: Tensor  # (B, S) bool, False on padding


@dataclass
class DecoderPair:
    """One decoder layer, object queries only: hidden (B, Q, C), logits (B, Q, K), boxes (B, Q, 4)."""

    student_hidden: Tensor
    teacher_hidden: Tensor
    student_logits: Tensor
    teacher_logits: Tensor
    student_boxes: Tensor
    teacher_boxes: Tensor


_PARALLEL_TWO_STAGE = (
    "MODEL.DISTILL.MODE 'parallel' cannot distill the decoder of a two-stage {name}: teacher and student "
    "pick different proposals, so their queries do not correspond. Use MODE 'teacher_forced' or set "
    "MODEL.DISTILL.DEC_*_WEIGHT to 0.")


def _layer_predictions(outputs: Dict) -> List[Dict[str, Tensor]]:
    return list(outputs.get("aux_outputs", [])) + [{"pred_logits": outputs["pred_logits"],
                                                     "pred_boxes": outputs["pred_boxes"]}]


class _Adapter:
    """Pairs built from the shared `TransformerStates` of student and (parallel mode) teacher.
    Subclasses give only what differs per architecture: where the teacher's transformer and
    heads live (`network`), and how its layers run on the student's inputs (teacher forcing,
    from the states' `internals`)."""

    attention_kind: str
    name: str

    @staticmethod
    def network(teacher):
        """The module holding the teacher's `transformer`, `two_stage` and `layer_predictions`."""
        return teacher

    @classmethod
    def encoder_pairs(cls, student_out: Dict, teacher, teacher_out: Optional[Dict]) -> List[EncoderPair]:
        if teacher_out is not None:
            t = teacher_out["states"]
            teacher_layers = list(zip(t.encoder_states, t.encoder_attention))
        else:
            teacher_layers = cls._teacher_forced_encoder(student_out["states"].internals, cls.network(teacher))
        st = student_out["states"]
        valid = ~st.padding_mask
        return [EncoderPair(s_attn, t_attn, s_out, t_out, valid)
                for s_out, s_attn, (t_out, t_attn) in zip(st.encoder_states, st.encoder_attention, teacher_layers)]

    @classmethod
    def decoder_pairs(cls, student_out: Dict, teacher, teacher_out: Optional[Dict]) -> List[DecoderPair]:
        network = cls.network(teacher)
        if teacher_out is not None:
            if network.two_stage:
                raise ValueError(_PARALLEL_TWO_STAGE.format(name=cls.name))
            t_hidden, t_preds = list(teacher_out["states"].decoder_states), _layer_predictions(teacher_out)
        else:
            t_hidden, t_preds = cls._teacher_forced_decoder(student_out["states"].internals, network)
        student_preds = _layer_predictions(student_out)
        return [DecoderPair(s_h, t_h, s_p["pred_logits"], t_p["pred_logits"], s_p["pred_boxes"], t_p["pred_boxes"])
                for s_h, t_h, s_p, t_p in zip(student_out["states"].decoder_states, t_hidden, student_preds, t_preds)]


class DETRAdapter(_Adapter):
    """`AQDETR`: explicit attention maps; its transformer is seq-first inside, so teacher-forced
    layers take seq-first inputs; one shared head for every layer, or one head per layer with box
    refinement (then each layer refines the student's anchors)."""

    attention_kind = "softmax_map"
    name = "DETR"

    @staticmethod
    @torch.no_grad()
    def _teacher_forced_encoder(tr: Dict, teacher):
        """Each teacher encoder layer on the student's input to it: (output (B, S, C), attention) pairs."""
        inputs = [tr["enc_input"]] + tr["enc_states"][:-1]
        layers = [layer(x.detach(), src_key_padding_mask=tr["mask"], pos=tr["pos"].detach())
                  for layer, x in zip(teacher.transformer.encoder.layers, inputs)]
        return [(out.transpose(0, 1), attn) for out, attn in layers]

    @staticmethod
    @torch.no_grad()
    def _teacher_forced_decoder(tr: Dict, teacher):
        """Each teacher decoder layer on the student's queries, query positions (and anchors) and memory."""
        inputs = [tr["tgt"]] + tr["dec_raw_states"][:-1]
        references = tr.get("dec_references", [None] * len(inputs))
        priors = tr.get("dec_cross_attn_prior", [None] * len(inputs))
        memory, pos = tr["memory"].detach(), tr["pos"].detach()
        t_hidden, t_preds = [], []
        for lid, layer in enumerate(teacher.transformer.decoder.layers):
            raw, _, _ = layer(inputs[lid].detach(), memory, memory_key_padding_mask=tr["mask"], pos=pos,
                              query_pos=tr["dec_query_pos"][lid].detach(),
                              memory_mask=None if priors[lid] is None else priors[lid].detach())
            hidden = teacher.transformer.decoder.norm(raw).transpose(0, 1)
            reference = None if references[lid] is None else references[lid].detach()
            logits, boxes = teacher.layer_predictions(lid, hidden, reference)
            t_hidden.append(hidden)
            t_preds.append({"pred_logits": logits, "pred_boxes": boxes})
        return t_hidden, t_preds


class DeformableDETRAdapter(_Adapter):
    """`AQDeformableDETR`: batch-first tensors, deformable attention weights, per-layer heads; the
    network after the backbone is the model's `detector`."""

    attention_kind = "deformable_weights"
    name = "Deformable-DETR"

    @staticmethod
    def network(teacher):
        return teacher.detector

    @staticmethod
    @torch.no_grad()
    def _teacher_forced_encoder(tr: Dict, det):
        """Each teacher encoder layer on the student's input to it: (output (B, S, C), weights) pairs."""
        encoder = det.transformer.encoder
        reference = encoder.get_reference_points(tr["spatial_shapes"], tr["valid_ratios"])
        inputs = [tr["src_flatten"]] + tr["enc_states"][:-1]
        return [layer(x.detach(), tr["pos_flatten"].detach(), reference, tr["spatial_shapes"],
                      tr["level_start_index"], tr["mask_flatten"])
                for layer, x in zip(encoder.layers, inputs)]

    @staticmethod
    @torch.no_grad()
    def _teacher_forced_decoder(tr: Dict, det):
        """Each teacher decoder layer on the student's queries, references and memory."""
        references = [tr["init_reference"]] + list(tr["inter_references"][:-1])
        inputs = [tr["tgt"]] + list(tr["hs"][:-1])
        memory, query_pos = tr["memory"].detach(), tr["query_pos"].detach()
        t_hidden, t_preds = [], []
        for lid, layer in enumerate(det.transformer.decoder.layers):
            reference = references[lid].detach()
            ratios = tr["valid_ratios"] if reference.shape[-1] == 2 else tr["valid_ratios"].repeat(1, 1, 2)
            hidden, _, _ = layer(inputs[lid].detach(), query_pos, reference[:, :, None] * ratios[:, None],
                                 memory, tr["spatial_shapes"], tr["level_start_index"], tr["mask_flatten"])
            logits, boxes = det.layer_predictions(lid, hidden, reference)
            t_hidden.append(hidden)
            t_preds.append({"pred_logits": logits, "pred_boxes": boxes})
        return t_hidden, t_preds


# Meta-architecture name -> adapter.
ADAPTERS = {"AQDETR": DETRAdapter, "AQDeformableDETR": DeformableDETRAdapter}
