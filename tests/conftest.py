"""The tests never reach a hub: a missing file with a hub copy must fail at once, not retry a network.

Their verdicts must not depend on the CPU, the thread count or the kernels PyTorch picks. To check that, run the
suite with ``MULTITASK_TEST_THREADS=1`` (or 2), and with ``ATEN_CPU_CAPABILITY=default`` or ``avx2`` (PyTorch's
other kernel sets); ``OMP_NUM_THREADS`` carries the thread count into the CLI tests' subprocesses."""

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("MULTITASK_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["MULTITASK_TEST_THREADS"]))
