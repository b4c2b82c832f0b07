"""aqdetr_d2.utils.numerics: the line that tells whether two runs can match, against torch's own report."""
import os
import re
import subprocess
import sys

SCRIPT = ("import torch\n"
          "from aqdetr_d2.utils.numerics import numerics_summary\n"
          "print(numerics_summary())\n"
          "print(torch.__config__.show())\n"
          "print(torch.__config__.parallel_info())\n")


def _summary_and_torch_report(**env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env={**clean, **env}, check=True,
                         capture_output=True, text=True).stdout
    summary, report = out.split("\n", 1)
    return summary, re.search(r"CPU capability usage: (\w+)", report).group(1)


def test_summary_names_atens_capability_and_no_caps():
    summary, torch_says = _summary_and_torch_report()
    assert summary.startswith(f"CPU capability {torch_says}, no instruction caps, torch ")


def test_summary_names_the_caps_that_are_set():
    # "default" (no vector kernels) exists on every x86 and ARM build, so the cap always applies.
    summary, torch_says = _summary_and_torch_report(ATEN_CPU_CAPABILITY="default", MKL_ENABLE_INSTRUCTIONS="AVX2")
    assert torch_says == "DEFAULT"
    assert summary.startswith("CPU capability DEFAULT, ATEN_CPU_CAPABILITY=default, MKL_ENABLE_INSTRUCTIONS=AVX2, torch ")


def test_summary_names_the_threads_torch_uses():
    for threads, words in (("1", "1 thread"), ("2", "2 threads")):
        out = subprocess.run([sys.executable, "-c", SCRIPT], env={**os.environ, "OMP_NUM_THREADS": threads},
                             check=True, capture_output=True, text=True).stdout
        assert re.search(r"at::get_num_threads\(\) : (\d+)", out).group(1) == threads  # torch's own report
        assert out.split("\n", 1)[0].endswith(f", {words}")
