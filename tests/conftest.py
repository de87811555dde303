"""The tests never reach a hub: a missing file with a hub copy must fail at once, not retry a network.

Their verdicts must not depend on the CPU, the thread count or the kernels PyTorch picks. To check that, run the
suite with ``MULTITASK_TEST_THREADS=1`` (or 2), and with ``ATEN_CPU_CAPABILITY=default`` or ``avx2`` (PyTorch's
other kernel sets); ``OMP_NUM_THREADS`` carries the thread count into the CLI tests' subprocesses.

On a machine with a GPU they still run on the CPU (their configs say ``device: cpu``, and ``auto`` sees no CUDA
here, nor in their subprocesses): bit-exact checks need deterministic kernels. Tests marked ``gpu`` alone see the
GPU, and skip where there is none."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if os.environ.get("MULTITASK_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["MULTITASK_TEST_THREADS"]))


_CUDA_PRESENT = torch.cuda.is_available


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one, the only tests that see it")


@pytest.fixture(autouse=True)
def _cuda_only_for_gpu_tests(request, monkeypatch):
    if request.node.get_closest_marker("gpu") is not None:
        if not _CUDA_PRESENT():
            pytest.skip("needs a CUDA device")
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CLI tests' subprocesses
