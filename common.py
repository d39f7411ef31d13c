"""
What every script shares: how an error is reported, which device and precision 'auto' means, where
a dataset lives, and the optional plotting library. Scripts import this (and the other library modules), never each other.
"""

import os
import sys
from contextlib import nullcontext

import torch

REPO = os.path.dirname(os.path.abspath(__file__))
DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def fail(message):
    """One line on stderr and exit status 2. torch's own messages can run to many lines: keep the first."""
    print(f"error: {str(message).strip().splitlines()[0] if str(message).strip() else message}", file=sys.stderr)
    sys.exit(2)


def pick_device(device):
    """'auto' is cuda, then mps, then cpu; anything else is taken as given."""
    if device != 'auto':
        return device
    if torch.cuda.is_available():
        return 'cuda'
    return 'mps' if torch.backends.mps.is_available() else 'cpu'


def pick_dtype(dtype, device):
    """'auto' is bfloat16 on a GPU that supports it, float16 on an older GPU (training adds a GradScaler),
    float32 everywhere else. Other values must name a DTYPES entry."""
    if dtype == 'auto':
        if not device.startswith('cuda'):
            return 'float32'
        return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'
    if dtype not in DTYPES:
        fail(f"dtype must be 'auto' or one of {', '.join(DTYPES)}, not {dtype!r}")
    return dtype


def autocast(device, dtype):
    """The context a model runs in: float32 runs as is, lower precisions under autocast."""
    if dtype == 'float32':
        return nullcontext()
    return torch.autocast(device_type=device.split(':')[0], dtype=DTYPES[dtype])


def synchronizer(device):
    """A function that waits for the device's queued work (timers call it before reading the clock)."""
    return {'cuda': torch.cuda.synchronize, 'mps': torch.mps.synchronize}.get(device.split(':')[0], lambda: None)


def dataset_dir(dataset):
    """A dataset by name (a folder under data/) or by path (a folder with train.bin, val.bin, meta.json)."""
    return dataset if os.path.isdir(dataset) else os.path.join(REPO, 'data', dataset)


def pyplot():
    """matplotlib.pyplot drawing to files, or None (after saying how to install it) where matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib: pip install -e '.[plot]'")
        return None
    return plt
