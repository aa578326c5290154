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


@pytest.fixture(scope="session")
def probe_ckpt(tmp_path_factory):
    """A tiny motion probe (160 frames, 80 steps, ~5 s): enough to test the plumbing and that
    training moves the held-out error, not a useful probe."""
    import attributes
    path = tmp_path_factory.mktemp("probe") / "probe.pt"
    ck = attributes.train_probe(str(path), n_train=160, n_heldout=48, steps=80, batch=32,
                                log=lambda *a: None)
    return path, ck


@pytest.fixture
def cli_actions():
    """cli_actions(fn, argv) -> the argparse actions (options and positionals, every sub-parser's
    too) that fn builds before it parses argv; parse_args is stubbed out, so nothing runs."""
    import argparse
    from unittest import mock

    def collect(fn, argv):
        seen = []
        orig = argparse.ArgumentParser.add_argument

        def record(self, *a, **kw):
            act = orig(self, *a, **kw)
            if act.help is not argparse.SUPPRESS and "-h" not in act.option_strings:
                seen.append(act)
            return act

        with mock.patch.object(argparse.ArgumentParser, "add_argument", record), \
                mock.patch.object(argparse.ArgumentParser, "parse_args", side_effect=SystemExit):
            try:
                fn(argv)
            except SystemExit:
                pass
        assert seen, "no options were recorded"
        return seen
    return collect
