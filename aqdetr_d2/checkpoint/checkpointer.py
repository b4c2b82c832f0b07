"""DetectionCheckpointer that refuses checkpoints which do not fit the model."""
import re

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from ..errors import UserInputError
from .safe_load import load_pickle_weights, load_torch_weights
from ..quant.quantizers import BitWidthMismatchError
from ..quant.export import check_export_fits, check_requantization, exported_state_dict, is_export


class CheckpointMismatchError(UserInputError, RuntimeError):
    """A checkpoint that does not fit the model; the message names the file and the fix."""


# Where `_load_file` hands an export file to `_load_model`.
_EXPORT_KEY = "__aqdetr_export__"
# Quantizer state is initialised from data when absent, so a float checkpoint may lack it.
_CLASS_HEAD = re.compile(r"class_embed(\.\d+)?\.(weight|bias)$")
# Names only a transformer detector's checkpoint holds (never an ImageNet backbone's).
_DETECTOR_KEY_PARTS = ("transformer.", "class_embed", "bbox_embed", "query_embed", "input_proj")
_OPTIONAL_KEY_PARTS = ("_quant.", "quantizer", "aux_query_embed", "aux_anchor_embed")  # aux queries: training-only, may be absent


class AQDETRCheckpointer(DetectionCheckpointer):
    """Loads like `DetectionCheckpointer`, but raises `CheckpointMismatchError` when

    - a tensor's shape differs from the model's (Detectron2 would silently skip it), or
    - the checkpoint holds more than the backbone (a whole-detector checkpoint) yet leaves
      model parameters unset, i.e. it was made for another architecture or config.

    A backbone-only checkpoint (ImageNet initialisation) may leave the rest unset, unless
    `require_complete` (used for distillation teachers, which must be whole detectors).

    It also reads the packed integer files of `tools/export_quantized.py` (so `MODEL.WEIGHTS`
    may name one): they load as the fake-quantized model they were exported from, provided the
    config quantizes the same layers at the same bit widths.

    With `use_ema` (inference with `MODEL_EMA.ENABLED`) a checkpoint's averaged weights
    ("model_ema") load in place of its trained ones; a checkpoint without them loads as it is.
    """

    def __init__(self, model, save_dir="", *, require_complete: bool = False, use_ema: bool = False,
                 role: str = "checkpoint", reinit_class_heads: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.require_complete = require_complete
        self.use_ema = use_ema
        self.role = role  # how errors name the file, e.g. "teacher checkpoint (MODEL.DISTILL.TEACHER_WEIGHTS)"
        self._filename = ""
        # MODEL.REINIT_CLASS_HEADS: class heads of another class count keep their initialisation.
        self.reinit_class_heads = reinit_class_heads

    def load(self, path, *args, **kwargs):
        self._filename = path
        return super().load(path, *args, **kwargs)

    def _torch_load(self, f):
        return load_torch_weights(f, self.role)

    def _load_file(self, filename):
        if filename.endswith((".pkl", ".pyth")):
            loaded = self._load_unpickled_file(filename)
        else:
            loaded = super()._load_file(filename)
        if is_export(loaded.get("model")):
            export = loaded["model"]
            return {"model": exported_state_dict(export), _EXPORT_KEY: export}
        if self.use_ema:
            if "model_ema" in loaded:
                self.logger.info("Loading the averaged weights (model_ema) of %s", filename)
                loaded["model"] = loaded.pop("model_ema")["weights"]
            else:
                self.logger.warning("MODEL_EMA.ENABLED, but %s holds no averaged weights; loading its "
                                    "weights as they are", filename)
        return loaded

    def _load_unpickled_file(self, filename):
        """Detectron2's .pkl (model zoo) and .pyth (pycls) handling, without running code from the file."""
        if filename.endswith(".pyth"):
            data = load_torch_weights(filename, self.role)
            if "model_state" not in data:
                raise CheckpointMismatchError(f"{self.role} {filename}: pycls checkpoints hold 'model_state'")
            state = {k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")}
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        with PathManager.open(filename, "rb") as f:
            data = load_pickle_weights(filename, f, self.role)
        if "model" in data and "__author__" in data:  # Detectron2 model zoo format
            return data
        if "blobs" in data:  # Caffe2 / Detectron1 detection models; ImageNet models have no "blobs"
            data = data["blobs"]
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def _load_model(self, checkpoint):
        export = checkpoint.pop(_EXPORT_KEY, None)
        if export is not None:
            check_export_fits(self.model, export)
        incompatible = self._load_checked(checkpoint)
        if export is not None:
            check_requantization(self.model, export)
        return incompatible

    def _load_checked(self, checkpoint):
        ckpt_keys = list(checkpoint["model"])
        # Detectron2's own loader renames pickled Caffe2/ImageNet weights first; check after it.
        try:
            incompatible = super()._load_model(checkpoint)
        except BitWidthMismatchError as e:
            raise CheckpointMismatchError(
                f"{self.role} {self._filename}: its quantizers have other bit widths than the config's ({e}); "
                "set MODEL.QUANT.WEIGHT_BITS / ACT_BITS / ATTN_BITS to those it was trained with") from None
        model_keys = list(self.model.state_dict())
        reinit = {k for k, _, _ in incompatible.incorrect_shapes if self.reinit_class_heads and _CLASS_HEAD.search(k)}
        if reinit:
            self.logger.info("MODEL.REINIT_CLASS_HEADS: %d class-head tensors of another class count keep their "
                             "initialisation: %s", len(reinit), sorted(reinit))
        wrong_shapes = [(k, a, b) for k, a, b in incompatible.incorrect_shapes if k not in reinit]
        if wrong_shapes:
            lines = [f"  {k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in wrong_shapes]
            raise CheckpointMismatchError(
                f"{self.role} {self._filename}: tensors do not fit the model (check MODEL.* sizes such as "
                "NUM_CLASSES, HIDDEN_DIM, NUM_OBJECT_QUERIES and the backbone options against the config that "
                "trained it; to fine-tune to another NUM_CLASSES set MODEL.REINIT_CLASS_HEADS True):\n"
                + "\n".join(lines[:30]))
        unset = set(incompatible.missing_keys) | {k for k, _, _ in incompatible.incorrect_shapes}
        loaded = [k for k in model_keys if k not in unset]
        # A detector checkpoint, whether or not its detector tensors found a home in this model: one
        # made for another architecture matches only the backbone, yet is no ImageNet backbone.
        unused = [k for k in incompatible.unexpected_keys if any(p in k for p in _DETECTOR_KEY_PARTS)]
        whole_detector = any(not k.startswith("backbone.") for k in loaded) or bool(unused)
        missing = [k for k in incompatible.missing_keys
                   if k not in reinit and not any(p in k for p in _OPTIONAL_KEY_PARTS)]
        if (whole_detector or self.require_complete) and missing:
            extra = f" and holds {len(unused)} tensors the model has no place for, e.g. {unused[:3]}" if unused else ""
            raise CheckpointMismatchError(
                f"{self.role} {self._filename} does not fit this model: it leaves {len(missing)} model tensors "
                f"unset, e.g. {missing[:3]}{extra}. It was made for another architecture or config: use the "
                "config that trained it, or convert official checkpoints with tools/convert_official_checkpoint.py.")
        if not loaded and ckpt_keys:
            raise CheckpointMismatchError(
                f"{self.role} {self._filename}: no tensor matches the model; checkpoint keys look like "
                f"{ckpt_keys[:5]}, model keys like {model_keys[:5]}.")
        return incompatible
