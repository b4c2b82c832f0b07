"""interpolate_state_dicts against a per-tensor reference, and its refusals."""
import pytest
import torch

from aqdetr_d2.engine import interpolate_state_dicts


def _states():
    g = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(3, 4, generator=g), "step": torch.tensor([0.5]),
             "initialized": torch.tensor(0, dtype=torch.uint8), "count": torch.tensor(3)}
    tuned = {"w": torch.randn(3, 4, generator=g), "step": torch.tensor([0.25]),
             "initialized": torch.tensor(1, dtype=torch.uint8), "count": torch.tensor(7)}
    return start, tuned


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.75, 1.0])
def test_matches_the_per_tensor_formula(alpha):
    start, tuned = _states()
    out = interpolate_state_dicts(start, tuned, alpha)
    for key in ("w", "step"):
        want = [(1 - alpha) * s + alpha * t for s, t in zip(start[key].flatten().tolist(), tuned[key].flatten().tolist())]
        assert out[key].flatten().tolist() == pytest.approx(want, abs=1e-6)
    # Integer state is not averaged: a quantizer is initialised or not.
    assert out["initialized"].item() == 1 and out["count"].item() == 7
    assert out["initialized"].dtype == torch.uint8
    assert torch.equal(tuned["w"], _states()[1]["w"])  # inputs untouched


def test_refusals():
    start, tuned = _states()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate_state_dicts(start, tuned, 1.5)
    with pytest.raises(ValueError, match="another config"):
        interpolate_state_dicts({**start, "extra": torch.zeros(1)}, tuned, 0.5)
    with pytest.raises(ValueError, match=r"w: start \(4, 3\)"):
        interpolate_state_dicts({**start, "w": torch.zeros(4, 3)}, tuned, 0.5)
