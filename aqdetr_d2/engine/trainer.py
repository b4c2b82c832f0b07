"""`AQDETRTrainer`: Detectron2's DefaultTrainer with DETR data, optimizer and evaluators."""
import functools
import logging
import os
import weakref

from torch.nn.parallel import DistributedDataParallel

from detectron2.data import MetadataCatalog, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..checkpoint import AQDETRCheckpointer
from ..data import (DetrDatasetMapper, check_dataset_dicts, check_evaluator_type, check_images_readable,
                    check_num_classes, load_dataset)
from ..data.stream import SAMPLERS, ResumableTrainLoader
from ..distill import build_distiller
from ..modeling import meta_arch_class
from .calibration import initialize_quantizers
from .determinism import ExactResumeHook
from .ema import ModelEMA
from .optimizer import build_detr_optimizer

logger = logging.getLogger(__name__)


def _coco_evaluator(dataset_name, cfg, output_folder):
    return COCOEvaluator(dataset_name, output_dir=output_folder)


def _voc_evaluator(dataset_name, cfg, output_folder):
    return PascalVOCDetectionEvaluator(dataset_name)


# MetadataCatalog's `evaluator_type` -> evaluator factory.
EVALUATORS = {"coco": _coco_evaluator, "pascal_voc": _voc_evaluator}


def num_classes_of(cfg) -> int:
    return meta_arch_class(cfg).config_of(cfg).NUM_CLASSES


def create_ddp_model(model, **kwargs):
    """Detectron2's helper pins `device_ids` to the GPU rank; on the CPU (gloo) DDP needs none."""
    if comm.get_world_size() == 1:
        return model
    device_ids = [comm.get_local_rank()] if model.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False, **kwargs)


class AQDETRTrainer(DefaultTrainer):
    """Trains `AQDETR` / `AQDeformableDETR` with Detectron2's hooks, writers and checkpoints.

    Differences from DefaultTrainer: DETR's dataset mapper, AdamW with a backbone learning-rate
    multiplier and full-model gradient clipping, annotation checks before training, a
    checkpointer that refuses mismatched weights, DDP that also works on the CPU, quantizer
    calibration after loading, and (with `MODEL.DISTILL.ENABLED`) a frozen teacher attached to
    the student, outside its state_dict, optimizer and DDP. With `MODEL_EMA.ENABLED` it keeps
    an average of the weights, updated in `run_step`, checkpointed as "model_ema", and evaluates
    that average instead of the trained weights.
    """

    def __init__(self, cfg):
        # DefaultTrainer.__init__ in the same order, restated rather than inherited because it
        # hard-wires two things this trainer changes: `create_ddp_model` (it passes the GPU
        # rank as device_ids, which DDP refuses for a CPU model) and `DetectionCheckpointer`
        # (built before `build_hooks`, which captures it; this one also checkpoints the data
        # stream and the average, and refuses mismatched weights).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        if cfg.MODEL.DISTILL.ENABLED:
            # Attached here, not in build_model: evaluation must not need the teacher.
            model.distiller = build_distiller(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.model_ema = ModelEMA(cfg.MODEL_EMA.DECAY) if cfg.MODEL_EMA.ENABLED else None
        # The data stream's position is checkpointed so that --resume continues it exactly.
        extra = {"train_data": data_loader}
        if self.model_ema is not None:
            extra["model_ema"] = self.model_ema
        self.checkpointer = AQDETRCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self),
                                               reinit_class_heads=cfg.MODEL.REINIT_CLASS_HEADS, **extra)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def train(self):
        """Train; returns the final evaluation results (DefaultTrainer returns them only when
        TEST.EXPECTED_RESULTS is set)."""
        if self.model_ema is not None:
            self.model_ema.start(self.model, self.start_iter)
        super().train()
        return getattr(self, "_last_eval_results", None)

    def run_step(self):
        super().run_step()
        if self.model_ema is not None:
            # In the step, not in a hook: every after_step hook (checkpointer, evaluation) then
            # sees this step's average, whatever the hooks' order.
            self.model_ema.update(self.model)

    def resume_or_load(self, resume=True):
        """Load weights (or resume), then calibrate any quantizer the checkpoint did not set."""
        super().resume_or_load(resume=resume)
        if self.start_iter > 0 and not self.data_loader.restored:
            logger.warning("The checkpoint holds no data-stream state (it predates exact resume): training "
                           "continues from iteration %d with the data stream from its start", self.start_iter)
        initialize_quantizers(self.cfg, self.model)

    def build_hooks(self):
        # First: its after_step gathers the data stream's state before the checkpointer saves it.
        ret = [ExactResumeHook(self.data_loader, self.cfg.SOLVER.CHECKPOINT_PERIOD, self.max_iter),
               *super().build_hooks()]
        if self.model_ema is None:
            return ret
        return [hooks.EvalHook(self.cfg.TEST.EVAL_PERIOD, self._test_averaged_weights)
                if isinstance(h, hooks.EvalHook) else h for h in ret]

    def _test_averaged_weights(self):
        with self.model_ema.applied(self.model):
            self._last_eval_results = self.test(self.cfg, self.model)
        return self._last_eval_results

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_detr_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's training data (datasets, sampler, aspect-ratio grouping) as a stream whose
        position is checkpointed (`ResumableTrainLoader`)."""
        for name in cfg.DATASETS.TRAIN:
            dicts = load_dataset(name)
            if cfg.DATASETS.CHECK_ANNOTATIONS:
                check_dataset_dicts(dicts, name, num_classes_of(cfg))
            check_num_classes(num_classes_of(cfg), name)
            check_images_readable(dicts, name, cfg.DATASETS.CHECK_IMAGES)
        if cfg.DATALOADER.SAMPLER_TRAIN not in SAMPLERS:
            raise ValueError(f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN!r} is not supported by "
                             f"AQDETRTrainer's resumable loader; use one of {sorted(SAMPLERS)}")
        dataset_dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN,
                                                    filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        world_size = comm.get_world_size()
        if cfg.SOLVER.IMS_PER_BATCH % world_size:
            raise ValueError(f"SOLVER.IMS_PER_BATCH {cfg.SOLVER.IMS_PER_BATCH} is not divisible by the "
                             f"{world_size} processes; make it a multiple of {world_size}")
        make_sampler = functools.partial(SAMPLERS[cfg.DATALOADER.SAMPLER_TRAIN], dataset_dicts, cfg)
        return ResumableTrainLoader(
            dataset_dicts, DetrDatasetMapper(cfg, is_train=True), make_sampler, cfg.SOLVER.IMS_PER_BATCH // world_size,
            seed=cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed(),
            aspect_ratio_grouping=cfg.DATALOADER.ASPECT_RATIO_GROUPING, num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, is_train=False))

    @classmethod
    def check_test_datasets(cls, cfg):
        """Before any training: every test dataset can be evaluated and has the model's classes."""
        for name in cfg.DATASETS.TEST:
            check_evaluator_type(name, EVALUATORS)
            load_dataset(name)  # loading sets its thing_classes
            check_num_classes(num_classes_of(cfg), name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        check_evaluator_type(dataset_name, EVALUATORS)
        evaluator_type = MetadataCatalog.get(dataset_name).evaluator_type
        return EVALUATORS[evaluator_type](dataset_name, cfg, output_folder)
