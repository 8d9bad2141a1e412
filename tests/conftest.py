import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _unseeded_rng():
    """Each test starts as a fresh process: no Caffe seed set (protonet.rng)."""
    from protonet import rng
    rng.reset()
    yield
    rng.reset()
