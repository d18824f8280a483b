"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture
def one_compute_thread():
    """One torch thread and one numba thread for the test.

    Two cores are shared by many processes; numba's parallel pool (the synthetic renderer) next to
    torch's OpenMP pool makes small torch ops about 7x slower.
    """
    import numba
    import torch

    before, before_numba = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(1)
    numba.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    numba.set_num_threads(before_numba)
