"""Test configuration shared by every test file.

Without a GPU the Triton kernels run under the Triton interpreter on CPU tensors. The
interpreter is chosen when a kernel is defined, so it must be selected before any
lag_triton.kernels.triton module is imported: that is why it is done here, at collection time.

The sm_90 compile check (tests/test_triton_compile.py) starts in the background once the
selected tests are known, so that its minutes of compiler time overlap the interpreter tests.
"""

from lag_triton.kernels import use_triton_interpreter_without_gpu

use_triton_interpreter_without_gpu()


def pytest_collection_finish(session):
    # xdist workers each collect every test but run a share of them: there the test starts its own check
    if session.config.option.collectonly or hasattr(session.config, "workerinput"):
        return
    for item in session.items:
        module = getattr(item, "module", None)
        if item.name == getattr(module, "TEST_NAME", None) and hasattr(module, "start_compile_check"):
            session.config.lag_compile_check = module.start_compile_check(background=True)
            return


def pytest_unconfigure(config):
    check = getattr(config, "lag_compile_check", None)
    if check is not None:
        check.stop()  # a session that ended before the compile test (-x, an interrupt) leaves no compiler behind
