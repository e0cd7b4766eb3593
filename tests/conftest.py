"""Test-wide settings: one torch thread (on this 2-core machine, 2 threads plus any other busy process made small
workloads 30-60x slower), deterministic seeds."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _cpu_default_device():
    """Every test starts with the CPU as the default device."""
    torch.set_default_device("cpu")
    yield
