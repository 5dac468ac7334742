"""Adapter library: read PEFT folders, align (data-free SVD), save/load one safetensors file;
build it streaming into the file, grow or shrink it in place."""

from .build import BuildReport, build_library
from .general import GeneralKnowledge
from .grow import add_adapters, remove_adapters
from .library import Library, LibraryFormatError
from .peft_reader import AdapterError
from .weights import ModuleWeights

__all__ = [
    "Library",
    "ModuleWeights",
    "GeneralKnowledge",
    "AdapterError",
    "LibraryFormatError",
    "BuildReport",
    "build_library",
    "add_adapters",
    "remove_adapters",
]
