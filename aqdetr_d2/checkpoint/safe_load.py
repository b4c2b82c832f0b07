"""Checkpoint files read without running code from them.

`torch.load` with `weights_only=True` (passed explicitly, so that
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn it off) reads .pth files. Detectron2's `.pkl`
model-zoo files (Caffe2 / Detectron weights: dicts of NumPy arrays) are read by an unpickler
that builds only plain containers, strings, numbers and NumPy arrays; any other global in the
pickle is refused before it is called.
"""
import pickle

import torch

from ..errors import UserInputError

__all__ = ["UnsafeCheckpointError", "load_pickle_weights", "load_torch_weights"]


class UnsafeCheckpointError(UserInputError, RuntimeError):
    """A checkpoint file that would run code, or cannot be read."""


# (module, name) of the only callables a weights pickle may name: NumPy array and scalar
# reconstruction and the containers Detectron2's zoo files use.
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # pickle protocol 5
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
}


class _WeightsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a weights file")


def load_pickle_weights(path: str, file, what: str = "checkpoint") -> dict:
    """A `.pkl` weights `what` (already opened, binary) as the dict it holds."""
    try:
        data = _WeightsUnpickler(file, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"{what} {path} holds Python objects besides weights ({e}); loading it would run code from the file, "
            "so it is refused. Load it only if you trust it, and re-save its tensors with torch.save.") from None
    except (EOFError, ValueError) as e:
        raise UnsafeCheckpointError(f"{what} {path} is truncated or not a pickle file ({e}); download it again") from None
    if not isinstance(data, dict):
        raise UnsafeCheckpointError(f"{what} {path} holds a {type(data).__name__}, not a dict of weights")
    return data


def load_torch_weights(path: str, what: str = "checkpoint") -> dict:
    """A `.pth` `what` read with weights_only=True; one clear line instead of torch's traceback."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UnsafeCheckpointError(f"{what} {path} does not exist") from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(
            f"{what} {path} is not a plain weights file ({first}); loading it would run code from the file, "
            "so it is refused. Load it only if you trust it, and re-save its state_dict.") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpointError(f"{what} {path} cannot be read: it is truncated or not a PyTorch "
                                    f"checkpoint ({first}); download or copy it again") from None
