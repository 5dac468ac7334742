"""Adapter library: read PEFT folders, align (data-free SVD), save/load one safetensors file."""

from .library import Library, LibraryFormatError, ModuleWeights
from .peft_reader import AdapterError

__all__ = ["Library", "ModuleWeights", "AdapterError", "LibraryFormatError"]
