"""Read PEFT LoRA adapter folders (docs/design.md §5) without loading every tensor at once.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or, loaded with
``torch.load(weights_only=True)`` only, ``adapter_model.bin``); :mod:`.sources` finds the folder
of a Hub path. Keys look like
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

from . import safetensors_io as sio
from .weights import FACTOR_DTYPES


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
    (
        "kasa_config",
        (None,),
        "KaSA truncates the base weight's smallest singular components and puts a learned diagonal between A and B, "
        "which LAG cannot represent",
    ),
    ("monteclora_config", (None,), "MonteCLoRA samples its factors, which LAG cannot represent"),
    (
        "arrow_config",
        (None,),
        "it is PEFT's Arrow router over other adapters, not an adapter (its lora_B is zero): build the library "
        "from the task adapters it routes over",
    ),
)
# VeLoRA changes only the backward (compressed activations for A's gradient); its forward is LoRA's,
# and the projection it saves for training is not part of the update.
_VELORA_TENSOR = ".lora_velora_embed"
# Inits that replace the base weight W by a residual when the adapter is created (PiSSA, OLoRA,
# CorDA, LoRA-GA: W - s B0 A0; LoftQ: a quantised W): the saved factors are a delta on that residual, which PEFT
# rebuilds from W on load, so they are no LoRA of W. PEFT converts PiSSA/OLoRA/CorDA adapters into
# one (rank 2r, init_lora_weights true), which LAG reads (LoRA-GA's too).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
_BASE_CHANGING_WHY = (
    "this init replaces the base weight by a residual (PiSSA, OLoRA, CorDA, LoRA-GA) or a quantised copy (LoftQ) "
    "when the adapter is created, so its factors are a delta on that changed weight, not a LoRA of the "
    "base model LAG routes over. Convert it with PEFT first: peft_model.save_pretrained(out, "
    "path_initial_model_for_weight_conversion=<the adapter saved at initialisation>) writes a plain LoRA "
    "of the original base (LoftQ adapters cannot be converted)"
)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_CONFIG = "adapter_config.json"
ADAPTER_FILES = (_CONFIG, *_WEIGHT_FILES)  # what a folder may hold that from_peft reads


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _is_positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _is_nonzero_number(v) -> bool:
    """A LoRA alpha: finite and not 0 (0 makes the update nothing; a negative one subtracts it, as PEFT allows)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v != 0


@dataclass
class ModuleFactors:
    """Where one module's LoRA factors live in an adapter, and their shapes."""

    key_a: str
    key_b: str
    rank: int
    d_in: int
    d_out: int
    scaling: float
    block_diagonal: str = ""  # BD-LoRA: "A" or "B" is stored as its nblocks diagonal blocks side by side
    nblocks: int = 1

    def stored_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(lora_A, lora_B) shapes in the file."""
        a, b = (self.rank, self.d_in), (self.d_out, self.rank)
        if self.block_diagonal == "A":
            a = (self.rank, self.d_in // self.nblocks)
        elif self.block_diagonal == "B":
            b = (self.d_out, self.rank // self.nblocks)
        return a, b


def _block_diagonal(weight: torch.Tensor, nblocks: int) -> torch.Tensor:
    """PEFT's BD-LoRA factor [out, in / nblocks] as the dense [out, in] block-diagonal matrix it is."""
    return torch.block_diag(*torch.chunk(weight, nblocks, dim=0))


@dataclass
class PeftAdapter:
    """One PEFT LoRA folder: its config and the (lazily loaded) factors of every module it targets."""

    path: Path
    config: dict
    modules: dict[str, ModuleFactors] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        value = self.config.get("base_model_name_or_path")
        return value if isinstance(value, str) else None

    def error(self, message: str) -> AdapterError:
        return AdapterError(f"adapter {str(self.path)!r}: {message}")

    @classmethod
    def open(cls, path: str | Path) -> PeftAdapter:
        """Read the config and tensor headers (not the tensor data) and validate them."""
        path = Path(path)
        adapter = cls(path=path, config={})
        config_file = path / _CONFIG
        if not path.is_dir():
            raise adapter.error("is not a directory")
        if not config_file.is_file():
            raise adapter.error(f"has no {_CONFIG}")
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except sio.JSON_ERRORS as e:
            raise adapter.error(f"{_CONFIG} is not valid JSON ({e})") from None
        except OSError as e:
            raise adapter.error(f"{_CONFIG} cannot be read ({e.strerror or e})") from None
        if not isinstance(config, dict):
            raise adapter.error(
                f"{_CONFIG} must hold a JSON object, got a JSON {sio.json_type(config)}: {config!r:.60}"
            )
        adapter.config = config
        adapter._check_config()
        adapter._index_weights(adapter._read_shapes())
        return adapter

    def _field_error(self, name: str, message: str) -> AdapterError:
        return self.error(f"{_CONFIG} field {name}={self.config.get(name)!r:.80} {message}")

    def _check_config(self) -> None:
        cfg = self.config
        if cfg.get("peft_type", "LORA") != "LORA":
            raise self._field_error("peft_type", "is refused: only LoRA adapters are supported")
        for name, fine, why in _REFUSED_CONFIG:
            value = cfg.get(name)
            if isinstance(value, list):
                value = tuple(value)
            if not isinstance(value, (dict, set)) and value in fine:
                continue
            raise self._field_error(name, f"is refused: {why}")
        bd = cfg.get("use_bdlora")
        if bd is not None:
            if not (isinstance(bd, dict) and _is_positive_int(bd.get("nblocks", 1))):
                raise self._field_error("use_bdlora", "must be an object with a positive integer nblocks")
            for name in ("target_modules_bd_a", "target_modules_bd_b"):
                patterns = bd.get(name) or []
                if not (isinstance(patterns, list) and all(isinstance(x, str) for x in patterns)):
                    raise self._field_error("use_bdlora", f"must give {name} as a list of strings")
        init = cfg.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise self._field_error("init_lora_weights", f"is refused: {_BASE_CHANGING_WHY}")
        if not _is_positive_int(cfg.get("r")):
            raise self._field_error("r", "must be a positive integer")
        if not _is_nonzero_number(cfg.get("lora_alpha")):
            raise self._field_error("lora_alpha", "must be a finite non-zero number")
        if not isinstance(cfg.get("use_rslora"), (bool, type(None))):
            raise self._field_error("use_rslora", "must be true or false")
        for name, valid, what in (
            ("rank_pattern", _is_positive_int, "a positive integer"),
            ("alpha_pattern", _is_nonzero_number, "a finite non-zero number"),
        ):
            patterns = cfg.get(name)
            if patterns is None:
                continue
            if not isinstance(patterns, dict):
                raise self._field_error(name, "must be an object mapping module patterns to values")
            for pattern, value in patterns.items():
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise self._field_error(
                        name, f"has key {pattern!r}, which is not a valid regular expression ({e})"
                    ) from None
                if not valid(value):
                    raise self._field_error(name, f"maps {pattern!r} to {value!r:.40}; expected {what}")

    def weights_file(self) -> Path:
        for name in _WEIGHT_FILES:
            if (self.path / name).is_file():
                return self.path / name
        raise self.error(f"has no weights file ({' or '.join(_WEIGHT_FILES)})")

    def _tensor_error(self, file: Path, key: str, message: str) -> AdapterError:
        return self.error(f"{file.name}: tensor {key!r} {message}")

    def _read_shapes(self) -> dict[str, tuple[int, ...]]:
        file = self.weights_file()
        if file.suffix == ".bin":
            return {k: tuple(v.shape) for k, v in self._load_bin().items()}
        header = self._safetensors_header(file)
        for key, entry in header.entries.items():
            if entry.torch_dtype not in FACTOR_DTYPES:
                raise self._tensor_error(
                    file, key, f"has dtype {entry.dtype}; LoRA factors must be F64, F32, F16 or BF16"
                )
        return {k: e.shape for k, e in header.entries.items()}

    def _safetensors_header(self, file: Path) -> sio.Header:
        try:
            return sio.read_header(file)
        except sio.SafetensorsProblem as e:
            raise self.error(f"{file.name}: {e}") from None
        except OSError as e:
            raise self.error(f"{file.name} cannot be read ({e.strerror or e})") from None

    def _load_bin(self) -> dict[str, torch.Tensor]:
        file = self.path / "adapter_model.bin"
        try:  # weights_only: never unpickle arbitrary objects from an adapter file
            tensors = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure here means an unusable file
            raise self.error(f"{file.name} cannot be loaded with torch.load(weights_only=True): {e}") from None
        if not isinstance(tensors, dict):
            raise self.error(f"{file.name} holds a {type(tensors).__name__}; expected a dict of tensor name -> tensor")
        for key, value in tensors.items():
            if not isinstance(key, str):
                raise self.error(
                    f"{file.name} has a key {key!r:.40} ({type(key).__name__}); tensor names must be strings"
                )
            if not isinstance(value, torch.Tensor):
                raise self._tensor_error(file, key, f"is a {type(value).__name__}, not a tensor")
            if value.dtype not in FACTOR_DTYPES:
                raise self._tensor_error(
                    file, key, f"has dtype {value.dtype}; LoRA factors must be float64, float32, float16 or bfloat16"
                )
        return tensors

    def _index_weights(self, shapes: dict[str, tuple[int, ...]]) -> None:
        cfg = self.config
        keys: dict[str, dict[str, str]] = {}
        for key in shapes:
            if _VELORA_TENSOR in key and cfg.get("velora_config"):
                continue
            if "lora_embedding_" in key:
                raise self.error(f"tensor {key!r}: embedding LoRA is refused (LAG routes linear layers only)")
            if "lora_magnitude_vector" in key:
                raise self.error(f"tensor {key!r}: DoRA magnitude vectors are refused")
            if key.endswith((".base_layer.weight", ".base_layer.bias")):
                raise self.error(
                    f"tensor {key!r} is a copy of a base layer's own weight, which PEFT saves when an adapter "
                    "targets an embedding or output layer (save_embedding_layers): LAG routes over the model's "
                    "weights and keeps none of its own. If the vocabulary was not resized, save the adapter again "
                    "with save_pretrained(..., save_embedding_layers=False)"
                )
            match = _KEY.match(key)
            if match is None:
                raise self.error(
                    f"tensor {key!r} is not a LoRA A/B weight (modules_to_save, biases and other "
                    "extra tensors are refused)"
                )
            pair = keys.setdefault(match["module"], {})
            if match["factor"] in pair:
                raise self.error(
                    f"module {match['module']!r} has two lora_{match['factor']} tensors: "
                    f"{pair[match['factor']]!r} and {key!r}"
                )
            pair[match["factor"]] = key
        if not keys:
            raise self.error("contains no LoRA weights")
        for module, pair in sorted(keys.items()):
            if set(pair) != {"A", "B"}:
                raise self.error(f"module {module!r} has lora_{''.join(pair)} but not its partner")
            shape_a, shape_b = shapes[pair["A"]], shapes[pair["B"]]
            if len(shape_a) != 2 or len(shape_b) != 2:
                raise self.error(
                    f"module {module!r}: lora_A {shape_a} / lora_B {shape_b} are not matrices "
                    "(convolution LoRA is refused)"
                )
            rank = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
            scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
            kind, nblocks = self._block_diagonal_kind(module)
            d_in = shape_a[1] * (nblocks if kind == "A" else 1)
            factors = ModuleFactors(pair["A"], pair["B"], rank, d_in, shape_b[0], scaling, kind, nblocks)
            if (shape_a, shape_b) != factors.stored_shapes() or rank % nblocks:
                bd = f" (BD-LoRA: lora_{kind} block-diagonal, {nblocks} blocks)" if kind else ""
                raise self.error(
                    f"module {module!r}: lora_A {shape_a} and lora_B {shape_b} disagree with the "
                    f"configured rank r={rank} (r / rank_pattern){bd}"
                )
            if rank > min(d_in, shape_b[0]):
                raise self.error(
                    f"module {module!r}: rank {rank} exceeds the layer's size {d_in} x {shape_b[0]} (d_in x d_out): "
                    "a rank is at most min(d_in, d_out)"
                )
            self.modules[module] = factors

    def _block_diagonal_kind(self, module: str) -> tuple[str, int]:
        """("A" / "B" / "", nblocks): which factor BD-LoRA stores block-diagonal for ``module``
        (PEFT: a pattern of target_modules_bd_a / _bd_b that is a substring of the module's name)."""
        bd = self.config.get("use_bdlora")
        if not bd:
            return "", 1
        for kind in ("A", "B"):
            if any(p in module for p in bd.get(f"target_modules_bd_{kind.lower()}") or []):
                return kind, bd.get("nblocks", 1)
        return "", 1

    def load_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """module -> (lora_A [r, d_in], lora_B [d_out, r]) for every module, read now."""
        file = self.weights_file()
        if file.suffix == ".bin":
            tensors = self._load_bin()
        else:
            header = self._safetensors_header(file)
            wanted = [k for f in self.modules.values() for k in (f.key_a, f.key_b)]
            missing = [k for k in wanted if k not in header.entries]
            if missing:
                raise self.error(f"{file.name} changed while reading: tensor {missing[0]!r} is gone")
            try:
                tensors = sio.read_tensors(file, header, wanted)
            except sio.SafetensorsProblem as e:
                raise self.error(f"{file.name}: {e}") from None
            except OSError as e:
                raise self.error(f"{file.name} could not be read ({e.strerror or e})") from None
        out = {}
        for m, f in self.modules.items():
            a, b = tensors[f.key_a], tensors[f.key_b]
            if (tuple(a.shape), tuple(b.shape)) != f.stored_shapes():
                raise self.error(f"module {m!r}: tensors changed shape while reading (file rewritten?)")
            if f.block_diagonal == "A":
                a = _block_diagonal(a, f.nblocks)
            elif f.block_diagonal == "B":
                b = _block_diagonal(b, f.nblocks)
            out[m] = (a, b)
        return out
