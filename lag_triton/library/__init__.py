"""Adapter library: read PEFT folders, align (data-free SVD), save/load one safetensors file or a
library folder of several; build it streaming into the file, grow or shrink it in place."""

from .build import BuildReport, build_library
from .folder import assemble_folder, compact_folder, is_library_folder
from .general import GeneralKnowledge
from .grow import add_adapters, remove_adapters
from .library import Library, LibraryFormatError
from .peft_reader import AdapterError
from .stacked import StackedModuleWeights
from .weights import ModuleWeights

__all__ = [
    "Library",
    "ModuleWeights",
    "StackedModuleWeights",
    "GeneralKnowledge",
    "AdapterError",
    "LibraryFormatError",
    "BuildReport",
    "build_library",
    "add_adapters",
    "remove_adapters",
    "assemble_folder",
    "compact_folder",
    "is_library_folder",
]
