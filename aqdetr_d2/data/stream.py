"""A training data stream that resumes exactly.

Detectron2's train loader restarts its sampler and its augmentation randomness when a run
resumes: the resumed run sees the first batches again, with other random flips and sizes, and
ends elsewhere than the run that was never stopped. Here every sample is a pure function of
(seed, rank, position in the rank's index stream): the index comes from a seeded Detectron2
sampler, and the augmentation draws from NumPy and `random` seeded by that triple just before
the mapper runs. The loader's whole state is then the next position and the positions waiting
in the aspect-ratio buckets; it is checkpointed as "train_data" and a resumed run continues
with the batches the uninterrupted run would have drawn, whatever DATALOADER.NUM_WORKERS is.
"""
import itertools
import logging
import operator
import random
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from detectron2.data import DatasetFromList
from detectron2.data.samplers import RepeatFactorTrainingSampler, TrainingSampler
from detectron2.utils import comm

__all__ = ["ResumableTrainLoader", "SAMPLERS", "sample_seed"]

logger = logging.getLogger(__name__)


def _training_sampler(dataset_dicts, cfg, seed):
    return TrainingSampler(len(dataset_dicts), seed=seed)


def _repeat_factor_sampler(dataset_dicts, cfg, seed):
    factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
        dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.REPEAT_SQRT)
    return RepeatFactorTrainingSampler(factors, seed=seed)


# DATALOADER.SAMPLER_TRAIN -> (dataset dicts, cfg, seed) -> an infinite, rank-sharded index sampler
# that depends on nothing but its seed. Module-level functions: DataLoader workers may pickle them.
SAMPLERS: Dict[str, Callable] = {"TrainingSampler": _training_sampler,
                                 "RepeatFactorTrainingSampler": _repeat_factor_sampler}


def sample_seed(seed: int, rank: int, position: int) -> int:
    """The 32-bit seed of the augmentation draws of one sample."""
    return int(np.random.SeedSequence([seed, rank, position]).generate_state(1)[0])


class _PositionedSamples(IterableDataset):
    """(position, mapped dict or None) for positions `start`, `start + 1`, ... of one rank's index
    stream. In DataLoader worker w of W it yields positions start + w, start + w + W, ..., which
    the DataLoader's round robin puts back in order; a sample the mapper drops comes as None so
    that the order never shifts."""

    def __init__(self, dataset, mapper, make_sampler, seed: int, start: int):
        self.dataset, self.mapper, self.make_sampler = dataset, mapper, make_sampler
        self.seed, self.start, self.rank = seed, start, comm.get_rank()

    def map_at(self, position: int, index: int):
        draw_seed = sample_seed(self.seed, self.rank, position)
        np.random.seed(draw_seed)  # Detectron2's augmentations draw from the global generators
        random.seed(draw_seed)
        return position, self.mapper(self.dataset[index])

    def indices(self, start: int):
        return itertools.islice(iter(self.make_sampler(self.seed)), start, None)

    def __iter__(self):
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for offset, index in enumerate(self.indices(self.start)):
            if offset % num_workers == worker_id:
                yield self.map_at(self.start + offset, index)


class ResumableTrainLoader:
    """Lists of mapped dicts (one rank's batches), as Detectron2's train loader yields, with a
    state to checkpoint: `state_dict` / `load_state_dict` give the seed and, per rank, the next
    stream position and the positions waiting in the aspect-ratio buckets.

    Args:
        dataset_dicts: the training dataset, in Detectron2's format.
        mapper: dataset dict -> model input dict (or None to drop the sample).
        make_sampler: seed -> an infinite index sampler, sharded by rank (`SAMPLERS`).
        batch_size: images per batch on this rank.
        seed: the stream's seed; the same on every rank.
        aspect_ratio_grouping: batch images with width > height apart from the others.
        num_workers: DataLoader worker processes; the batches do not depend on it.
    """

    def __init__(self, dataset_dicts: List[dict], mapper, make_sampler: Callable, batch_size: int, *, seed: int,
                 aspect_ratio_grouping: bool = True, num_workers: int = 0):
        self.dataset = DatasetFromList(dataset_dicts, copy=False)
        self.mapper, self.make_sampler, self.batch_size = mapper, make_sampler, batch_size
        self.seed, self.grouping, self.num_workers = int(seed), aspect_ratio_grouping, num_workers
        self.next_position = 0
        self.pending: List[List[int]] = [[], []]
        self._gathered: Optional[List[dict]] = None
        self._buckets = None  # (position, sample) pairs waiting per aspect-ratio group, while iterating
        self.restored = False  # whether load_state_dict ran (a resumed checkpoint held this state)

    def _bucket(self, sample: dict) -> int:
        return int(sample["width"] <= sample["height"]) if self.grouping else 0

    def _restored_buckets(self, samples: _PositionedSamples):
        """The waiting samples of a resumed stream, mapped again from their positions."""
        wanted = sorted(p for bucket in self.pending for p in bucket)
        mapped = {}
        if wanted:
            span = itertools.islice(samples.indices(wanted[0]), wanted[-1] - wanted[0] + 1)
            wanted_set = set(wanted)
            mapped = {p: samples.map_at(p, index)[1] for p, index in enumerate(span, wanted[0]) if p in wanted_set}
        return [[(p, mapped[p]) for p in bucket] for bucket in self.pending]

    def __iter__(self):
        samples = _PositionedSamples(self.dataset, self.mapper, self.make_sampler, self.seed, self.next_position)
        self._buckets = buckets = self._restored_buckets(samples)
        # Its own generator: creating the iterator must not draw from torch's global one, or a
        # resumed run's first step would see other dropout draws than the uninterrupted run's.
        loader = DataLoader(samples, num_workers=self.num_workers, collate_fn=operator.itemgetter(0),
                            generator=torch.Generator().manual_seed(self.seed))
        for position, sample in loader:
            self.next_position = position + 1
            if sample is None:
                continue
            bucket = buckets[self._bucket(sample)]
            bucket.append((position, sample))
            if len(bucket) == self.batch_size:
                batch = [s for _, s in bucket]
                bucket.clear()  # before the yield: code after it may never run
                yield batch

    def _local_state(self) -> dict:
        # While iterating, the waiting positions are those in the buckets; before, those restored.
        pending = [[p for p, _ in b] for b in self._buckets] if self._buckets is not None else self.pending
        return {"next_position": self.next_position, "pending": [list(b) for b in pending]}

    def gather(self) -> None:
        """Collect every rank's state for the checkpoint; called on all ranks before saving."""
        self._gathered = comm.all_gather(self._local_state()) if comm.get_world_size() > 1 else None

    def state_dict(self) -> dict:
        return {"seed": self.seed, "ranks": self._gathered or [self._local_state()]}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.restored = int(state["seed"]), True
        self._buckets = None  # the next iteration restores the buckets from `pending`
        ranks, world = state["ranks"], comm.get_world_size()
        if len(ranks) == world:
            mine = ranks[comm.get_rank()]
            self.next_position, self.pending = int(mine["next_position"]), [list(b) for b in mine["pending"]]
            return
        # Positions are per rank: with another number of processes, continue past every image the
        # checkpointed ranks used, in a new order.
        used = sum(int(r["next_position"]) for r in ranks)
        self.next_position, self.pending = used // world, [[], []]
        logger.warning("The checkpoint's data stream was written by %d processes, this run has %d: the "
                       "training images continue in another order than an uninterrupted run's", len(ranks), world)

