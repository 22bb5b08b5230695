import os

import pytest
import torch

# Tests are small; two threads keep them from fighting over the CPU.
torch.set_num_threads(int(os.environ.get("CLINFUSEDIFF_TEST_THREADS", "2")))


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
