"""ResumableTrainLoader: a stopped and resumed stream gives the batches of an uninterrupted one."""
import itertools
import random

import numpy as np
import pytest

from aqdetr_d2.data import stream
from aqdetr_d2.data.stream import ResumableTrainLoader, _training_sampler

# Wide and tall images, so that aspect-ratio grouping keeps samples waiting across batches.
DICTS = [{"image_id": i, "width": 80 if i % 3 else 40, "height": 60} for i in range(23)]


def draw_mapper(d):
    """A mapper whose output depends on the augmentation randomness, as a random flip's does."""
    return {**d, "draw": float(np.random.rand()), "py_draw": random.random()}


def dropping_mapper(d):
    return None if d["image_id"] == 5 else draw_mapper(d)


def _loader(mapper=draw_mapper, num_workers=0, grouping=True, seed=7):
    return ResumableTrainLoader(DICTS, mapper, lambda s: _training_sampler(DICTS, None, s), 4, seed=seed,
                                aspect_ratio_grouping=grouping, num_workers=num_workers)


def _take(loader, n):
    return [[(d["image_id"], d["draw"], d["py_draw"]) for d in batch] for batch in itertools.islice(loader, n)]


@pytest.mark.parametrize("grouping", [True, False])
@pytest.mark.parametrize("mapper", [draw_mapper, dropping_mapper])
def test_resumed_stream_continues_the_uninterrupted_one(grouping, mapper):
    straight = _take(_loader(mapper, grouping=grouping), 14)
    waited = False
    for stop in range(1, 13):
        first = _loader(mapper, grouping=grouping)
        assert _take(first, stop) == straight[:stop]
        state = first.state_dict()
        np.random.seed(123)  # whatever ran in between must not matter
        resumed = _loader(mapper, grouping=grouping, seed=0)
        resumed.load_state_dict(state)
        assert resumed.restored and resumed.seed == 7
        assert _take(resumed, 14 - stop) == straight[stop:]
        waited |= any(state["ranks"][0]["pending"])
    # With grouping, some stops leave samples waiting in a bucket: those are mapped again on resume.
    assert waited == grouping


def test_batches_do_not_depend_on_the_number_of_workers():
    assert _take(_loader(num_workers=2), 8) == _take(_loader(num_workers=0), 8)
    first = _loader(num_workers=2)
    _take(first, 3)
    resumed = _loader(num_workers=2)
    resumed.load_state_dict(first.state_dict())
    assert _take(resumed, 5) == _take(_loader(), 8)[3:]


def test_grouping_and_seed():
    batches = _take(_loader(), 10)
    for batch in batches:
        wide = {DICTS[i]["width"] > DICTS[i]["height"] for i, _, _ in batch}
        assert len(wide) == 1
    # Every image of an epoch appears before any repeats (Detectron2's TrainingSampler order).
    assert _take(_loader(seed=8), 3) != _take(_loader(seed=7), 3)


def test_another_number_of_processes_continues_past_the_used_images(monkeypatch):
    warnings = []
    monkeypatch.setattr(stream.logger, "warning", lambda message, *args: warnings.append(message % args))
    state = {"seed": 3, "ranks": [{"next_position": 10, "pending": [[9], []]},
                                  {"next_position": 12, "pending": [[], [11]]}]}
    loader = _loader()
    loader.load_state_dict(state)
    assert loader.next_position == 22 and loader.pending == [[], []]
    assert "written by 2 processes, this run has 1" in warnings[0]
