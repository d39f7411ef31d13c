import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)  # tiny models: threads only add overhead, and tests may run side by side


@pytest.fixture
def tiny_args():
    """Model args of a tiny GPT that tests can build in milliseconds."""
    return dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=50, dropout=0.0, bias=True)
