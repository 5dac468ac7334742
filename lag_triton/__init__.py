"""lag_triton: LoRA-Augmented Generation (Arrow retrieval + SpectR rerank) over large LoRA libraries.

lib = lag_triton.Library.from_peft(adapter_dirs)
lag_triton.patch(model, lib, k=20, top_m=1)
with lag_triton.trace(model) as tr:
    model.generate(...)
with lag_triton.scope(model, [["doc-a", "doc-b"], ["doc-c"]]):  # per batch row
    model.generate(...)
lag_triton.unpatch(model)
"""

from .library import AdapterError, Library, LibraryFormatError, ModuleWeights
from .patching import LagLinear, LibraryNotSavedWarning, patch, unpatch
from .routing import RoutingConfig
from .scopes import scope
from .tracing import Trace, trace

__version__ = "0.1.0"
__all__ = [
    "Library",
    "ModuleWeights",
    "AdapterError",
    "LibraryFormatError",
    "LibraryNotSavedWarning",
    "RoutingConfig",
    "patch",
    "unpatch",
    "scope",
    "trace",
    "Trace",
    "LagLinear",
    "__version__",
]
