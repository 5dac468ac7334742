"""Test configuration shared by every test file.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors. The
interpreter is chosen when a kernel is defined, so it must be selected before any
lag_triton.kernels.triton module is imported: that is why it is done here, at collection time.
"""

from lag_triton.kernels import use_triton_interpreter_without_gpu

use_triton_interpreter_without_gpu()
