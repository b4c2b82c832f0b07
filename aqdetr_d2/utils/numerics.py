"""What sets the last bits of CPU float results, so that runs can say whether they may match.

The same code, data and seed give the same training trajectory only under the same vector
instructions: ATen, MKL and oneDNN each pick AVX2 or AVX-512 kernels from the CPU, and these sum
in different orders. Low-bit fine-tunes magnify one rounding difference into a different model
(at W2A2A2 the gap between the two is the size of a seed's). The variables below cap each
library's instructions, which is how an AVX-512 machine reproduces a run made on an AVX2 one.
The number of threads matters too: a reduction split over two threads adds in another order.
"""
import os

import torch

__all__ = ["ISA_VARIABLES", "NUMERICS_TAG", "numerics_summary"]

# Environment variables that cap the vector instructions of ATen, MKL and oneDNN.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
# train_net.py logs "<NUMERICS_TAG> <numerics_summary()>" once per process.
NUMERICS_TAG = "Numerics:"


def numerics_summary() -> str:
    """One line naming ATen's CPU capability, the instruction caps set in the environment, the
    torch version and intra-op threads, e.g. "CPU capability AVX512, no instruction caps, torch
    2.14.1, 2 threads"."""
    caps = ", ".join(f"{name}={os.environ[name]}" for name in ISA_VARIABLES if os.environ.get(name))
    threads = torch.get_num_threads()
    return (f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {caps or 'no instruction caps'}, "
            f"torch {torch.__version__}, {threads} thread{'' if threads == 1 else 's'}")
