"""Read PEFT LoRA adapter folders (DESIGN §5) without loading every tensor at once.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or, loaded with
``torch.load(weights_only=True)`` only, ``adapter_model.bin``). Keys look like
``base_model.model.<module path>.lora_A.weight`` ([r, d_in]) and ``...lora_B.weight`` ([d_out, r]).
Everything LAG cannot represent is refused with an error naming the folder, module and field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


class AdapterError(ValueError):
    """A PEFT adapter folder that LAG cannot read or represent."""


# (config field, value that is fine, why LAG refuses anything else)
_REFUSED_CONFIG = (
    ("use_dora", (False, None), "DoRA adapters rescale the base weight per column, which LAG cannot route"),
    ("lora_bias", (False, None), "LoRA biases are not part of the low-rank update LAG applies"),
    ("bias", ("none", None), "bias training changes base-model biases, which LAG cannot route"),
    ("modules_to_save", ((), None), "modules_to_save replaces whole modules, which LAG cannot route"),
    ("trainable_token_indices", (None,), "trainable tokens change embeddings, which LAG cannot route"),
    ("target_parameters", ((), None), "LoRA on raw parameters (target_parameters) is not supported"),
    ("layer_replication", (None,), "layer_replication changes the model's layers"),
    ("use_qalora", (False, None), "QALoRA pools inputs, which LAG cannot represent"),
    ("alora_invocation_tokens", (None,), "activated LoRA (aLoRA) is applied conditionally, which LAG cannot represent"),
)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


@dataclass
class ModuleFactors:
    """Where one module's LoRA factors live in an adapter, and their shapes."""

    key_a: str
    key_b: str
    rank: int
    d_in: int
    d_out: int
    scaling: float


@dataclass
class PeftAdapter:
    """One PEFT LoRA folder: its config and the (lazily loaded) factors of every module it targets."""

    path: Path
    config: dict
    modules: dict[str, ModuleFactors] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def error(self, message: str) -> AdapterError:
        return AdapterError(f"adapter {str(self.path)!r}: {message}")

    @classmethod
    def open(cls, path: str | Path) -> "PeftAdapter":
        """Read the config and tensor shapes (not the tensor data) and validate them."""
        path = Path(path)
        adapter = cls(path=path, config={})
        config_file = path / "adapter_config.json"
        if not path.is_dir():
            raise adapter.error("is not a directory")
        if not config_file.is_file():
            raise adapter.error("has no adapter_config.json")
        try:
            adapter.config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise adapter.error(f"adapter_config.json is not valid JSON ({e})") from None
        adapter._check_config()
        adapter._index_weights(adapter._read_shapes())
        return adapter

    def _check_config(self) -> None:
        cfg = self.config
        if cfg.get("peft_type", "LORA") != "LORA":
            raise self.error(f"peft_type={cfg.get('peft_type')!r}; only LoRA adapters are supported")
        for name, fine, why in _REFUSED_CONFIG:
            value = cfg.get(name)
            if isinstance(value, list):
                value = tuple(value)
            if value not in fine:
                raise self.error(f"adapter_config.json field {name}={cfg.get(name)!r} is refused: {why}")
        for name in ("r", "lora_alpha"):
            if not isinstance(cfg.get(name), (int, float)) or cfg[name] <= 0:
                raise self.error(f"adapter_config.json field {name}={cfg.get(name)!r} must be a positive number")

    def weights_file(self) -> Path:
        for name in _WEIGHT_FILES:
            if (self.path / name).is_file():
                return self.path / name
        raise self.error(f"has no weights file ({' or '.join(_WEIGHT_FILES)})")

    def _read_shapes(self) -> dict[str, tuple[int, ...]]:
        file = self.weights_file()
        if file.suffix == ".bin":
            return {k: tuple(v.shape) for k, v in self._load_bin().items()}
        try:
            with safe_open(str(file), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise self.error(f"{file.name} is unreadable (truncated or not safetensors?): {e}") from None

    def _load_bin(self) -> dict[str, torch.Tensor]:
        file = self.path / "adapter_model.bin"
        try:  # weights_only: never unpickle arbitrary objects from an adapter file
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here means an unusable file
            raise self.error(f"{file.name} cannot be loaded with torch.load(weights_only=True): {e}") from None

    def _index_weights(self, shapes: dict[str, tuple[int, ...]]) -> None:
        cfg = self.config
        keys: dict[str, dict[str, str]] = {}
        for key in shapes:
            if "lora_embedding_" in key:
                raise self.error(f"tensor {key!r}: embedding LoRA is refused (LAG routes linear layers only)")
            if "lora_magnitude_vector" in key:
                raise self.error(f"tensor {key!r}: DoRA magnitude vectors are refused")
            match = _KEY.match(key)
            if match is None:
                raise self.error(f"tensor {key!r} is not a LoRA A/B weight (modules_to_save, biases and other "
                                 "extra tensors are refused)")
            keys.setdefault(match["module"], {})[match["factor"]] = key
        if not keys:
            raise self.error("contains no LoRA weights")
        for module, pair in sorted(keys.items()):
            if set(pair) != {"A", "B"}:
                raise self.error(f"module {module!r} has lora_{''.join(pair)} but not its partner")
            shape_a, shape_b = shapes[pair["A"]], shapes[pair["B"]]
            if len(shape_a) != 2 or len(shape_b) != 2:
                raise self.error(f"module {module!r}: lora_A {shape_a} / lora_B {shape_b} are not matrices "
                                 "(convolution LoRA is refused)")
            rank = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
            if shape_a[0] != rank or shape_b[1] != rank:
                raise self.error(f"module {module!r}: lora_A {shape_a} and lora_B {shape_b} disagree with the "
                                 f"configured rank r={rank} (r / rank_pattern)")
            if rank > min(shape_a[1], shape_b[0]):
                raise self.error(f"module {module!r}: rank {rank} exceeds the layer's size {shape_b[0]}x{shape_a[1]}")
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
            scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
            self.modules[module] = ModuleFactors(pair["A"], pair["B"], rank, shape_a[1], shape_b[0], scaling)

    def load_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module -> (lora_A [r, d_in], lora_B [d_out, r]) for every module, read now."""
        file = self.weights_file()
        if file.suffix == ".bin":
            tensors = self._load_bin()
            return {m: (tensors[f.key_a], tensors[f.key_b]) for m, f in self.modules.items()}
        try:
            with safe_open(str(file), framework="pt") as f:
                return {m: (f.get_tensor(mf.key_a), f.get_tensor(mf.key_b)) for m, mf in self.modules.items()}
        except (SafetensorError, OSError) as e:
            raise self.error(f"{file.name} could not be read (truncated?): {e}") from None
