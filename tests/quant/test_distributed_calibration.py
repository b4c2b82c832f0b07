"""Calibration statistics are reduced across DDP ranks (two gloo processes on the CPU).

The workers load `aqdetr_d2/quant` as a standalone package with Detectron2 made
unimportable, which also checks that the library depends on PyTorch only.
"""
import math
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = r'''
import importlib.util, os, sys
import torch
import torch.distributed as dist

sys.modules["detectron2"] = None  # any detectron2 import now fails
root, rank, init_file, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
package = os.path.join(root, "aqdetr_d2", "quant")
spec = importlib.util.spec_from_file_location(
    "quant", os.path.join(package, "__init__.py"), submodule_search_locations=[package])
quant = importlib.util.module_from_spec(spec)
sys.modules["quant"] = quant
spec.loader.exec_module(quant)

torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
torch.manual_seed(rank)
batches = [torch.randn(3, 4, 5) * (rank + 1) for _ in range(rank + 1)]  # 1 batch on rank 0, 2 on rank 1
lsq = quant.LSQQuantizer(4, granularity="head", num_channels=4)
minmax = quant.MinMaxQuantizer(4, granularity="head", num_channels=4)
idle = quant.LSQQuantizer(4)  # sees data on rank 0 only
first_use = quant.LSQQuantizer(8)
with quant.calibration(torch.nn.ModuleList([lsq, minmax, idle])):
    for b in batches:
        lsq(b)
        minmax(b)
    if rank == 0:
        idle(batches[0])
first_use(batches[0])
torch.save({"lsq": lsq.state_dict(), "minmax": minmax.state_dict(), "idle": idle.state_dict(),
            "first_use": first_use.state_dict(), "batches": batches}, out)
dist.destroy_process_group()
'''


def test_calibration_is_reduced_across_ranks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    init_file = tmp_path / "store"
    outs = [tmp_path / f"rank{r}.pt" for r in range(2)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(script), ROOT, str(r), str(init_file), str(outs[r])],
                         env=env, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    r0, r1 = (torch.load(o) for o in outs)
    for name in ("lsq", "minmax", "idle", "first_use"):
        for key in r0[name]:
            assert torch.equal(r0[name][key], r1[name][key]), (name, key)
        assert r0[name]["initialized"].item() == 1

    data = torch.cat(r0["batches"] + r1["batches"])  # (9, 4, 5): every batch of both ranks
    expected = 2 * data.abs().mean(dim=(0, 2)) / math.sqrt(7)
    assert torch.allclose(r0["lsq"]["scale"], expected)
    amax = data.abs().amax(dim=(0, 2))
    assert torch.allclose(r0["minmax"]["scale"], amax / 7)
    expected_idle = 2 * r0["batches"][0].abs().mean() / math.sqrt(7)
    assert torch.allclose(r0["idle"]["scale"], expected_idle.reshape(1))
    firsts = torch.cat([r0["batches"][0], r1["batches"][0]])
    assert torch.allclose(r0["first_use"]["scale"], (2 * firsts.abs().mean() / math.sqrt(127)).reshape(1))
