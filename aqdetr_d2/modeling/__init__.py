from .meta_arch import AQDETR, AQDeformableDETR, meta_arch_class

__all__ = ["AQDETR", "AQDeformableDETR", "meta_arch_class"]
