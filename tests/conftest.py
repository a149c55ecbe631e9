"""Test configuration.

Without a CUDA device, Triton kernels run through Triton's CPU interpreter: the variable must be
set before triton is first imported, which is why it is set here at import time. On a GPU machine
the same tests run the compiled kernels on the GPU (see ``kernel_device``).
"""
import fcntl
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# GPU tests tune with one config per key (xlx_fast.ops.attention.tuning): a wide search is the
# benchmarks' job, and in tests it costs minutes of compiling
os.environ.setdefault("XLX_FAST_TUNING", "test")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run by benchmarks/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def kernel_device():
    """Where Triton kernels run in tests: the GPU if present, else the CPU interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


RAY_LOCK = "/tmp/xlx-ray.lock"


@pytest.fixture(scope="module")
def ray_lock():
    """Held while a test module's Ray runs: a Ray started by another test process on this
    machine waits for it (two Ray instances at once break each other)."""
    with open(RAY_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
