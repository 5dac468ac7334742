"""Adapter library: read PEFT folders, align (data-free SVD), save/load one safetensors file."""

from .library import Library, LibraryFormatError
from .peft_reader import AdapterError
from .weights import ModuleWeights

__all__ = ["Library", "ModuleWeights", "AdapterError", "LibraryFormatError"]
