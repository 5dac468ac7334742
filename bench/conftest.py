"""pytest configuration for bench/ (collected only by `pytest bench/`; `pytest tests/` never looks here).

The bench tests always run on CPU at tiny sizes; without a GPU the Triton backend runs under the
Triton interpreter, which must be chosen before lag_triton.kernels.triton is imported.
"""

import torch

from lag_triton.kernels import use_triton_interpreter_without_gpu

use_triton_interpreter_without_gpu()
torch.set_num_threads(min(2, torch.get_num_threads()))
