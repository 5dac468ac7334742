"""Test configuration shared by every test file.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors. The
interpreter is chosen when a kernel is defined, so TRITON_INTERPRET must be set before any
lag_triton.kernels.triton module is imported: that is why it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
