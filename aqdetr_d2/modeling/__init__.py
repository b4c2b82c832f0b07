from .meta_arch import AQDETR, AQDeformableDETR

__all__ = ["AQDETR", "AQDeformableDETR"]
