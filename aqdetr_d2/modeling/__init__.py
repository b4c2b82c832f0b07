from .meta_arch import AQDETR, AQDeformableDETR
from .set_prediction import SetPredictionDetector, meta_arch_class

__all__ = ["AQDETR", "AQDeformableDETR", "SetPredictionDetector", "meta_arch_class"]
