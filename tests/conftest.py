"""Shared pytest setup: few threads (the suite shares two cores) and a float64 fixture."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs on one thread, and a test whose code changes the count (the CLI's ``--threads``,
    ``scorekit demo``) cannot leak it into the next: on a busy 2-core machine two threads per process
    were measured many-fold slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    """Run the test with float64 as torch's default dtype, restoring the previous default after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(old)
