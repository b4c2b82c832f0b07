"""What makes `--resume` exact besides the checkpointed tensors: per-step seeds and the data
stream's state of every rank."""
import random

import numpy as np
import torch

from detectron2.engine import HookBase
from detectron2.utils import comm


def reseed_step(seed: int, iteration: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and `random` from (seed, iteration, rank)."""
    step_seed = int(np.random.SeedSequence([seed, iteration, comm.get_rank(), 1]).generate_state(1)[0])
    torch.manual_seed(step_seed)
    np.random.seed(step_seed)
    random.seed(step_seed)


class ExactResumeHook(HookBase):
    """Before every step, reseeds from the training data's seed (`ResumableTrainLoader.seed`, which
    a resumed checkpoint restores): dropout and other draws of step i are then the same whether
    the run started at 0 or resumed at i, whatever ran in between (evaluation, calibration).

    After a step that the main process checkpoints (every `period` iterations and the last),
    gathers every rank's data-stream state into it. Must come before Detectron2's
    PeriodicCheckpointer, which runs on the main process only.
    """

    def __init__(self, train_data, period: int, max_iter: int):
        self.train_data, self.period, self.max_iter = train_data, period, max_iter

    def before_step(self):
        reseed_step(self.train_data.seed, self.trainer.iter)

    def after_step(self):
        step = self.trainer.iter + 1
        if comm.get_world_size() > 1 and (step % self.period == 0 or step >= self.max_iter):
            self.train_data.gather()
