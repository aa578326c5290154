"""Shared test set-up: deterministic seeds and a thread count that suits the 2-core CI machines."""
import os
import random

# One thread per process: the suite starts subprocesses (torchrun with 2 ranks, CLIs) on 2-core
# machines, and oversubscribed BLAS/OpenMP threads are many times slower than one thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


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
