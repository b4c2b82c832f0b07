"""
Data-driven initialisation of every quantizer of a model from a few batches.

Without it each quantizer initialises itself from the first tensor it sees; calibrating over
N batches averages the statistics over more data (and over DDP ranks).
"""
import itertools
from contextlib import contextmanager
from typing import Iterable, Iterator, List, Optional

import torch
from torch import nn

from .quantizers import QuantizerBase


def iter_quantizers(model: nn.Module) -> Iterator[QuantizerBase]:
    """The quantizers of `model`, in module order (the same on every DDP rank)."""
    return (m for m in model.modules() if isinstance(m, QuantizerBase))


@contextmanager
def calibration(model: nn.Module) -> Iterator[List[QuantizerBase]]:
    """
    Inside the block every quantizer of `model` observes its input and passes it through
    unquantized; on leaving it, each sets its parameters from everything it observed. Under
    torch.distributed every rank must leave the block (statistics are reduced across ranks).
    On an exception the statistics are dropped and the quantizers left as they were.
    """
    quantizers = list(iter_quantizers(model))
    for q in quantizers:
        q.start_calibration()
    try:
        yield quantizers
    except BaseException:
        for q in quantizers:
            q.cancel_calibration()
        raise
    for q in quantizers:
        q.finish_calibration()


def calibrate(model: nn.Module, batches: Iterable, num_batches: Optional[int] = None) -> int:
    """
    Initialise every quantizer of `model` from `model(batch)` over the first `num_batches`
    batches (all if None), in eval mode and without gradients; training flags are restored.
    Returns the number of batches used. For other call signatures, use `calibration(model)`.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    used = 0
    try:
        with torch.no_grad(), calibration(model):
            for batch in itertools.islice(batches, num_batches):
                model(batch)
                used += 1
    finally:
        for m, mode in modes:
            m.training = mode
    return used
