"""AQ-DETR for Detectron2: low-bit quantized DETR / Deformable-DETR with auxiliary queries."""
from setuptools import find_packages, setup

setup(
    name="aqdetr_d2",
    version="0.1.0",
    description="Low-bit quantized detection transformers (AQ-DETR) as a Detectron2 extension",
    packages=find_packages(include=["aqdetr_d2", "aqdetr_d2.*"]),
    python_requires=">=3.10",
    # detectron2 itself is installed by scripts/install.sh: pip cannot resolve it on 3.11.
    install_requires=[
        "torch>=2.1",
        "torchvision",
        "fvcore",
        "pycocotools",
        "numpy<2",
        "opencv-python",
        "scipy",
    ],
    # ONNX export and onnxruntime evaluation (aqdetr_d2.deploy, tools/export_onnx.py).
    extras_require={"deploy": ["onnx>=1.17", "onnxruntime>=1.20", "ml_dtypes<0.6"]},
)
