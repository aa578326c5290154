"""Shared test set-up: deterministic seeds and a thread count that suits the 2-core CI machines."""
import os
import random

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed_everything():
    # Every test starts from the same RNG state, so a failure reproduces on re-run.
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def cuda_ok():
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
