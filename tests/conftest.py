"""Shared test settings: quiet, single-threaded, deterministic."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def aldp():
    """The built-in alanine dipeptide system (cached by ``get_system``; treat it as read-only)."""
    from regflow_mm.systems import get_system

    return get_system("aldp")
