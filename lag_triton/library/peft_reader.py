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
    ("modules_to_save", ((), None), "modules_to_save replaces whole modules, which LAG cannot route"),
    ("trainable_token_indices", (None,), "trainable tokens change embeddings, which LAG cannot route"),
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
# CorDA, ASTRA, LoRA-GA: W - s B0 A0; LoftQ: a quantised W): the saved factors are a delta on that residual,
# which PEFT rebuilds from W on load, so they are no LoRA of W. PEFT converts PiSSA/OLoRA/CorDA/ASTRA
# adapters into one (rank 2r, init_lora_weights true), which LAG reads (LoRA-GA's too). The inits known
# to leave W as it is are listed instead: PEFT adds new ones each release, and one that changes W read
# as a LoRA of W would be silently wrong.
_BASE_KEEPING_INITS = ("gaussian", "eva", "orthogonal", "mica", "nora")
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "astra", "lora_ga", "loftq")
_BASE_CHANGING_WHY = (
    "this init replaces the base weight by a residual (PiSSA, OLoRA, CorDA, ASTRA, LoRA-GA) or a quantised "
    "copy (LoftQ) when the adapter is created, so its factors are a delta on that changed weight, not a LoRA of the "
    "base model LAG routes over. Convert it with PEFT first: peft_model.save_pretrained(out, "
    "path_initial_model_for_weight_conversion=<the adapter saved at initialisation>) writes a plain LoRA "
    "of the original base (LoftQ adapters cannot be converted)"
)
# PEFT wraps each targeted parameter of a module (``target_parameters``) in a ParamWrapper, nested
# in the order the module registers them: the first is innermost, so its factors sit under one
# ".base_layer" per wrapper outside it. transformers' expert modules register their projections in
# the order they run; a module's targeted parameters are sorted so to tell which key is which.
_PARAMETER_ORDER = ("gate_up_proj", "up_proj", "down_proj")
_WRAPPED = ".base_layer"
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


def _parameter_matches(module: str, target: str) -> bool:
    """Whether a target_parameters entry names a parameter of ``module`` (PEFT's matching: the
    parameter's full name is the entry or ends with "." + the entry)."""
    full = f"{module}.{target.rpartition('.')[2]}"
    return full == target or full.endswith("." + target)


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
    # LoRA on a 3-D expert parameter (target_parameters): the file holds every expert's factors in
    # one pair, lora_A [rank * num_experts, d_in] and lora_B [d_out, rank * num_experts]; these are
    # expert ``expert``'s (PEFT's ParamWrapper: A.reshape(E, r, d_in)[e], B.reshape(d_out, r, E)[..., e])
    expert: int = 0
    num_experts: int = 1

    @property
    def library_rank(self) -> int:
        """The rank the library holds: a rank above min(d_in, d_out) (PEFT saves one, e.g. "all-linear"
        on a 1-output gate) is that minimum, which bounds the update's rank (:func:`.align.align_lora`)."""
        return min(self.rank, self.d_in, self.d_out)

    def stored_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(lora_A, lora_B) shapes in the file."""
        r = self.rank * self.num_experts
        a, b = (r, self.d_in), (self.d_out, r)
        if self.block_diagonal == "A":
            a = (self.rank, self.d_in // self.nblocks)
        elif self.block_diagonal == "B":
            b = (self.d_out, self.rank // self.nblocks)
        return a, b

    def select(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This module's (lora_A [rank, d_in], lora_B [d_out, rank]) from the stored pair."""
        if self.num_experts > 1:
            a = a[self.expert * self.rank : (self.expert + 1) * self.rank]
            b = b[:, self.expert :: self.num_experts]
        if self.block_diagonal == "A":
            a = _block_diagonal(a, self.nblocks)
        elif self.block_diagonal == "B":
            b = _block_diagonal(b, self.nblocks)
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
            try:  # PEFT saves every adapter of a model but "default" in a subfolder of its name
                inside = sorted(sub.name for sub in path.iterdir() if (sub / _CONFIG).is_file())
            except OSError:
                inside = []
            hint = f" (its subfolders {inside[:5]} hold adapters: give one of them)" if inside else ""
            raise adapter.error(f"has no {_CONFIG}{hint}")
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
        targets = cfg.get("target_parameters")
        if targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) and t for t in targets)):
            raise self._field_error("target_parameters", "must be a list of parameter names")
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
        if not (
            init is None or isinstance(init, bool) or (isinstance(init, str) and init.lower() in _BASE_KEEPING_INITS)
        ):
            raise self._field_error(
                "init_lora_weights",
                f"is refused: not an init known to leave the base weight as it is ({', '.join(_BASE_KEEPING_INITS)}, "
                "true or false); an init that changes it makes the factors a delta on another weight, not a LoRA of "
                "the base model LAG routes over",
            )
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
        embedding = next((key for key in shapes if "lora_embedding_" in key), None)
        if embedding is not None:  # before the base-layer copies PEFT saves with it, whose advice would not help
            raise self.error(f"tensor {embedding!r}: embedding LoRA is refused (LAG routes linear layers only)")
        for key in shapes:
            if _VELORA_TENSOR in key and cfg.get("velora_config"):
                continue
            if "lora_magnitude_vector" in key:
                raise self.error(f"tensor {key!r}: DoRA magnitude vectors are refused")
            if key.endswith(".bias") and "lora_" not in key and cfg.get("bias") not in (None, "none"):
                raise self.error(
                    f"tensor {key!r} is a base-model bias trained with {_CONFIG} field bias={cfg['bias']!r:.20}: "
                    "bias training changes the model's own biases, which LAG cannot route"
                )
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
        wrapped = self._wrapped_parameters(keys)
        for module in keys:
            outer, nested, _ = module.partition(_WRAPPED + ".")
            if nested:  # a module inside a PEFT wrapper: no layer of the model has that name
                raise self.error(
                    f"module {module!r} lies inside PEFT's wrapper of {outer!r} (its {_WRAPPED[1:]}): PEFT saves its "
                    f"LoRA of an nn.MultiheadAttention so (the out_proj there, the packed in_proj on {outer!r} "
                    "itself), which LAG refuses: it routes linear layers, and an attention module is not one"
                )
        for module, pair in sorted(keys.items()):
            if set(pair) != {"A", "B"}:
                raise self.error(f"module {module!r} has lora_{''.join(pair)} but not its partner")
            shape_a, shape_b = shapes[pair["A"]], shapes[pair["B"]]
            if len(shape_a) != 2 or len(shape_b) != 2:
                raise self.error(
                    f"module {module!r}: lora_A {shape_a} / lora_B {shape_b} are not matrices "
                    "(convolution LoRA is refused)"
                )
            if module in wrapped:
                self._index_parameter(module, *wrapped[module], pair, shape_a, shape_b)
                continue
            unselected = self._unselected_by_config(module)
            if unselected is not None:
                raise self.error(
                    f"module {module!r} has LoRA factors, but {_CONFIG} does not select it ({unselected}): PEFT "
                    "would leave that layer as it is (it loads unexpected keys with a warning). Correct the config's "
                    "target_modules / layers_to_transform / exclude_modules, or save the adapter again"
                )
            rank = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg["r"])
            alpha = _pattern_value(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
            kind, nblocks = self._block_diagonal_kind(module)
            d_in = shape_a[1] * (nblocks if kind == "A" else 1)
            factors = ModuleFactors(
                pair["A"], pair["B"], rank, d_in, shape_b[0], self._scaling(rank, alpha), kind, nblocks
            )
            self._add_module(module, factors, shape_a, shape_b)

    def _scaling(self, rank: int, alpha: float) -> float:
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def _add_module(self, module: str, factors: ModuleFactors, shape_a, shape_b, what: str = "") -> None:
        """Check ``factors`` against the stored shapes and keep them as ``module``."""
        rank, kind, nblocks = factors.rank, factors.block_diagonal, factors.nblocks
        if (shape_a, shape_b) != factors.stored_shapes() or rank % nblocks:
            bd = f" (BD-LoRA: lora_{kind} block-diagonal, {nblocks} blocks)" if kind else ""
            raise self.error(
                f"module {module!r}{what}: lora_A {shape_a} and lora_B {shape_b} disagree with the "
                f"configured rank r={rank} (r / rank_pattern){bd}"
            )
        self.modules[module] = factors

    def _wrapped_parameters(self, keys: dict[str, dict[str, str]]) -> dict[str, tuple[str, str]]:
        """Key module -> (module, parameter) for the factors of PEFT's ParamWrappers (target_parameters).

        A module with n targeted parameters saves n factor pairs, at ``module``,
        ``module.base_layer``, ... (outermost first); the innermost wraps the parameter the module
        registers first (``_PARAMETER_ORDER``). Keys of target_modules LoRA are not in the result.
        """
        targets = self.config.get("target_parameters") or []
        held: dict[str, set[int]] = {}  # module -> wrapper depths with factors
        for key in keys:
            module, depth = key, 0
            while module.endswith(_WRAPPED):
                module, depth = module[: -len(_WRAPPED)], depth + 1
            held.setdefault(module, set()).add(depth)
        out = {}
        for module, depths in held.items():
            matching = [t for t in targets if _parameter_matches(module, t)]
            names = list(dict.fromkeys(t.rpartition(".")[2] for t in matching))
            specific = list(dict.fromkeys(t.rpartition(".")[2] for t in matching if "." in t))
            if depths == {0} and not specific and (len(names) != 1 or self._targets_module(module)):
                continue  # a target_modules layer: bare parameter names ("down_proj") match any module's name
            if len(names) != len(depths) and len(specific) == len(depths):
                names = specific  # PEFT wraps only the parameters a module has
            if not names:
                if depths != {0}:
                    raise self.error(
                        f"module {module!r} has factors under {_WRAPPED!r} (PEFT's parameter wrappers) but no "
                        "target_parameters entry names a parameter of it"
                    )
                continue
            if len(names) > 1 and not set(names) <= set(_PARAMETER_ORDER):
                raise self.error(
                    f"module {module!r}: target_parameters names its parameters {names}; LAG tells which saved factor "
                    f"pair wraps which only for {', '.join(_PARAMETER_ORDER)} (transformers' expert modules, which "
                    "register them in that order)"
                )
            if depths != set(range(len(names))):
                raise self.error(
                    f"module {module!r}: target_parameters names {len(names)} of its parameters ({', '.join(names)}) "
                    f"but the file holds {len(depths)} factor pairs for it: cannot tell which pair wraps which "
                    "parameter (a named parameter the model lacks?); save the adapter with target_parameters "
                    "naming only the parameters the module has"
                )
            ordered = sorted(names, key=lambda n: _PARAMETER_ORDER.index(n) if n in _PARAMETER_ORDER else 0)
            for depth in depths:
                out[module + _WRAPPED * depth] = (module, ordered[len(names) - 1 - depth])
        return out

    def _targets_module(self, module: str) -> bool:
        """Whether target_modules names ``module`` (PEFT's matching: a regex string matches the whole
        name; a list entry is the name or its last components; an unexpanded "all-linear" any)."""
        targets = self.config.get("target_modules")
        if isinstance(targets, str):
            try:
                return targets == "all-linear" or re.fullmatch(targets, module) is not None
            except re.error:
                return False
        if not isinstance(targets, (list, tuple)):  # the saved factors say what was targeted; this only disambiguates
            return False
        return any(module == t or module.endswith("." + t) for t in targets if isinstance(t, str))

    def _unselected_by_config(self, module: str) -> str | None:
        """Why PEFT would not put a LoRA on ``module`` with this config (its check_target_module_exists,
        PEFT 0.22), or None when it would or the config cannot tell (no target_modules, "all-linear"
        unexpanded, patterns Python cannot compile: PEFT would fail to load those itself)."""
        try:
            return _unselected(self.config, module)
        except (re.error, TypeError):
            return None

    def _index_parameter(self, key_module: str, module: str, parameter: str, pair, shape_a, shape_b) -> None:
        """The factors PEFT's ParamWrapper saved for ``module.parameter``: a 2-D ``weight``'s, kept as
        module ``module.weight`` (its update is the layer's own LoRA; a router's, :mod:`lag_triton.moe`);
        a 3-D expert parameter [E, ...] holds one LoRA per expert, kept as modules
        ``module.parameter.<e>`` (what :mod:`lag_triton.moe` routes)."""
        cfg, key = self.config, f"{module}.{parameter}"  # PEFT looks the patterns up by this key
        if self._block_diagonal_kind(key)[0]:
            raise self.error(f"parameter {key!r}: BD-LoRA on a targeted parameter is refused (PEFT has none)")
        rank = _pattern_value(cfg.get("rank_pattern") or {}, key, cfg["r"])
        scaling = self._scaling(rank, _pattern_value(cfg.get("alpha_pattern") or {}, key, cfg["lora_alpha"]))
        experts, left = divmod(shape_a[0], rank)
        what = f" (target_parameters {parameter!r}, factors {key_module}.lora_A/B)"
        if left or experts < 1:
            raise self.error(
                f"module {module!r}{what}: lora_A {shape_a} is not [r * experts, d_in] for the configured rank r={rank}"
            )
        if parameter == "weight":  # a 2-D weight [d_out, d_in] (patch checks the layer stores it so)
            if experts != 1:
                raise self.error(
                    f"module {module!r}{what}: lora_A {shape_a} holds {experts} ranks of r={rank} for a weight"
                )
            factors = ModuleFactors(pair["A"], pair["B"], rank, shape_a[1], shape_b[0], scaling)
            self._add_module(key, factors, shape_a, shape_b, what)
            return
        for e in range(experts):
            factors = ModuleFactors(
                pair["A"], pair["B"], rank, shape_a[1], shape_b[0], scaling, expert=e, num_experts=experts
            )
            self._add_module(f"{key}.{e}", factors, shape_a, shape_b, what)

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
            wanted = list(dict.fromkeys(k for f in self.modules.values() for k in (f.key_a, f.key_b)))
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
            out[m] = f.select(a, b)
        return out


def _unselected(cfg: dict, module: str) -> str | None:
    """:meth:`PeftAdapter._unselected_by_config` (re.error / TypeError for patterns and fields it cannot read)."""
    exclude, targets = cfg.get("exclude_modules"), cfg.get("target_modules")
    if isinstance(exclude, str) and exclude and re.fullmatch(exclude, module):
        return f"exclude_modules={exclude!r:.80} matches it"
    if isinstance(exclude, list) and any(module == e or module.endswith(f".{e}") for e in exclude):
        return f"exclude_modules={exclude!r:.80} names it"
    if targets is None:
        return "target_modules is null: only target_parameters are adapted" if cfg.get("target_parameters") else None
    if isinstance(targets, str):
        if targets == "all-linear" or re.fullmatch(targets, module):
            return None
        return f"target_modules={targets!r:.80} does not match its whole name"
    if module in targets:
        return None
    if not any(module.endswith(f".{t}") for t in targets):
        return f"target_modules={targets!r:.80} names neither it nor its last components"
    layers, patterns = cfg.get("layers_to_transform"), cfg.get("layers_pattern")
    if layers is None or layers == []:
        return None
    if not patterns:  # the first numbered component (an expert's index comes later)
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        found = next(filter(None, (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module) for p in patterns)), None)
    index = None if found is None else int(found["idx"])
    if index is None or not (index == layers if isinstance(layers, int) else index in layers):
        return f"layers_to_transform={layers!r:.80} does not hold its layer index ({index})"
    return None
