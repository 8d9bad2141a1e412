"""One global random state, as in Caffe (`Caffe::set_random_seed`).

Fillers, Dropout, shuffling and random crops all draw from torch's and numpy's default
generators, so seeding here (the solver's `random_seed`) makes a run repeatable.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def set_random_seed(seed: int) -> None:
    """Seed every generator protonet draws from; a negative seed leaves them as they are."""
    if seed < 0:
        return
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
