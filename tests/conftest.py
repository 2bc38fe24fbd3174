import os
import sys

# tests import the top-level modules (common, lora, model_decoder, ...) from the repo root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The Triton kernels run in Triton's interpreter on a machine without CUDA; the variable must be set
# before anything imports triton, and some test modules import libraries that do.
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault('TRITON_INTERPRET', '1')
except ImportError:
    pass


import pytest  # noqa: E402


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is far faster than two competing ones (and
    matches the torchrun ranks, started with OMP_NUM_THREADS=1)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
