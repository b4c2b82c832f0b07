"""AQ-DETR: low-bit quantized detection transformers with auxiliary queries, for Detectron2.

Importing the package registers the meta-architectures `AQDETR` / `AQDeformableDETR` and
the `shapes_train` / `shapes_val` / `shapes_holdout` datasets.
"""
try:
    import detectron2  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "aqdetr_d2 needs Detectron2, which is not on PyPI for this Python. "
        "Install it with `bash scripts/install.sh` from the project root."
    ) from e

from . import data, modeling  # noqa: F401  (registrations)
from .config import add_aqdetr_config

__all__ = ["add_aqdetr_config"]
