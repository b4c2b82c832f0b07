#!/usr/bin/env python
"""COCO AP of an exported ONNX detector, computed with onnxruntime and Detectron2's evaluator.

    python tools/eval_onnx.py --config-file configs/shapes/detr_lsq_w4a4.yaml --onnx out/detr_w4.onnx
    python tools/eval_onnx.py --config-file CFG --onnx F.onnx --threads 2 DATASETS.TEST "('shapes_holdout',)"

Each test image of DATASETS.TEST goes through the config's test mapper (resize, channel
order) into the graph's `image` input; the model the config builds (no weights needed) turns
the outputs into detections with its own `inference`, so the same post-processing as
`train_net.py --eval-only` follows. Prints Detectron2's `copypaste:` lines.
"""
import argparse
import logging

from detectron2.utils.logger import setup_logger

from aqdetr_d2.config import load_config
from aqdetr_d2.deploy.runtime import OnnxRuntimeDetector, ort_session
from aqdetr_d2.engine import AQDETRTrainer
from aqdetr_d2.errors import user_errors_exit


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--onnx", required=True, metavar="FILE.onnx", help="graph of tools/export_onnx.py")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)

    # The post-processing model needs no quantizers and no weights.
    cfg = load_config(args.config_file, args.opts + ["MODEL.QUANT.ENABLED", "False", "MODEL.WEIGHTS", ""])
    setup_logger(name="aqdetr_d2")
    setup_logger(name="detectron2")
    logging.getLogger("aqdetr_d2").info("evaluating %s with onnxruntime on %s", args.onnx, cfg.DATASETS.TEST)
    AQDETRTrainer.check_test_datasets(cfg)
    detector = OnnxRuntimeDetector(ort_session(args.onnx, args.threads), AQDETRTrainer.build_model(cfg),
                                   check_size=cfg.INPUT.MIN_SIZE_TEST)
    return AQDETRTrainer.test(cfg, detector)


if __name__ == "__main__":
    with user_errors_exit():  # a missing file, dataset or key: one line, exit 2
        main()
