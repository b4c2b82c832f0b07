"""Exponential moving average of the weights (`MODEL_EMA`), evaluated in place of the trained ones.

Short quantization-aware fine-tunes of a small DETR end at a noisy point of their trajectory:
two seeds of one run differ by 1 to 2 AP. The average of the last ~1/(1 - decay) iterates is a
steadier estimate of where the fine-tune went. The average covers every floating-point tensor of
the state_dict, quantizer step sizes included; integer state (e.g. quantizers' `initialized`) is
copied. Checkpoints keep the trained weights under "model" (so that a resume continues exactly)
and the average under "model_ema"; inference loaders pick the average with `use_ema`.
"""
import contextlib
import logging
from typing import Dict

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


class ModelEMA:
    """The running average `ema = decay * ema + (1 - decay) * weights`, one update per iteration.

    `weights` maps state_dict keys to tensors (shapes as in the model); it is empty until
    `reset` (start of training) or `load_state_dict` (resume).
    """

    def __init__(self, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"MODEL_EMA.DECAY must be in [0, 1), got {decay}; e.g. 0.99 averages "
                             "about the last 100 iterations")
        self.decay = decay
        self.weights: Dict[str, Tensor] = {}

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        self.weights = {k: v.detach().clone() for k, v in _unwrap(model).state_dict().items()}

    def _matching_state(self, model: nn.Module) -> Dict[str, Tensor]:
        current = _unwrap(model).state_dict()
        if current.keys() != self.weights.keys():
            raise RuntimeError("The checkpoint's model_ema holds other tensors than the model: it was made "
                               "with another config. Resume with that config, or start without --resume.")
        return current

    def follow_devices(self, model: nn.Module) -> None:
        """Move each average to its tensor's device (checkpoints load onto the CPU); refuses an
        average of another model before training starts."""
        current = self._matching_state(model)
        self.weights = {k: v.to(current[k].device) for k, v in self.weights.items()}

    def start(self, model: nn.Module, iteration: int) -> None:
        """At the start of training: average from the current weights, unless a resumed
        checkpoint restored the average."""
        if self.weights:
            self.follow_devices(model)
        else:
            self.reset(model)
            logger.info("MODEL_EMA: averaging from the weights at iteration %d (decay %s)", iteration, self.decay)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for key, value in self._matching_state(model).items():
            average = self.weights[key]
            if average.is_floating_point():
                average.lerp_(value, 1.0 - self.decay)
            else:
                average.copy_(value)

    @contextlib.contextmanager
    def applied(self, model: nn.Module):
        """Within the block the model holds the averaged weights; its own are restored after."""
        model = _unwrap(model)
        trained = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.weights)
        try:
            yield model
        finally:
            model.load_state_dict(trained)

    def state_dict(self) -> Dict:
        return {"decay": self.decay, "weights": self.weights}

    def load_state_dict(self, state: Dict) -> None:
        if state["decay"] != self.decay:
            logger.warning("Checkpoint's EMA was kept with decay %s; continuing with MODEL_EMA.DECAY %s",
                           state["decay"], self.decay)
        self.weights = {k: v.clone() for k, v in state["weights"].items()}
