"""Per-GPU launch-configuration tables for the Triton kernels (optional; the defaults need none).

Every launcher picks its block sizes with a deterministic function of the shapes
(``select_config``, ``apply_config``). A table measured on one card by ``bench/tune_kernels.py``
can override them: a JSON file

    {"card": "NVIDIA H200", "triton": "3.6.0", "entries": [
        {"op": "arrow_select", "k_pad": 32, "t": [1, 16], "n": [1, 1000000], "config": {"BLOCK": 2048, ...}},
        {"op": "lora_apply", "t": [64, 1000000], "d_out": [8192, 8192], "config": {"BLOCK_T": 16, ...}}]}

where each entry matches one op, optional exact keys (``k_pad``) and inclusive [lo, hi] ranges of
shape sizes (those the op's launcher passes, ``OP_SHAPES``: ``t``, ``n``, ``d_out``, ``r``); the first
matching entry wins (``measured``, the timings that chose it, is not a condition), and its config is
set over the default's (it may give some keys only; the select's BLOCK and CAP go together).
Tables are looked up by the card's name in ``lag_triton/kernels/triton/tuned/<card slug>.json`` or
taken from the file named by ``LAG_TRITON_TUNING``. A table for another card is ignored. Lookups
happen at launch, on the host, from shapes only: a launch stays deterministic and capturable in a
CUDA graph.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

ENV_TABLE = "LAG_TRITON_TUNING"
TABLE_DIR = Path(__file__).resolve().parent / "tuned"
#: the configuration keys each op accepts, with the values that are valid for them
OP_KEYS = {
    "arrow_select": {"BLOCK", "CAP", "num_warps"},
    "lora_apply": {"BLOCK_T", "BLOCK_O", "num_warps"},
}
#: the shape sizes each op's launcher looks an entry up by (an entry keyed by others never matches)
OP_SHAPES = {"arrow_select": {"k_pad", "t", "n"}, "lora_apply": {"t", "d_out", "r"}}
#: the largest block size a config may give (a tile of 2**16 elements: past any kernel's registers)
MAX_BLOCK = 1 << 16
_NOT_SHAPE = ("op", "config", "measured")  # entry keys that are not shape conditions ("measured": evidence)
_forced: dict[str, dict] = {}  # op -> config, set by ``forced`` (the tuning script's candidates)


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def check_config(op: str, config: dict) -> dict:
    """A config for ``op``: known keys, positive power-of-two ints (num_warps 1..16). Raises ValueError."""
    if op not in OP_KEYS:
        raise ValueError(f"unknown tuned op {op!r}; expected one of {sorted(OP_KEYS)}")
    unknown = set(config) - OP_KEYS[op]
    if unknown:
        raise ValueError(f"{op} config has unknown keys {sorted(unknown)}; allowed: {sorted(OP_KEYS[op])}")
    for key, value in config.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value & (value - 1):
            raise ValueError(f"{op} config {key}={value!r} must be a positive power of two")
        if key == "num_warps" and value > 16:
            raise ValueError(f"{op} config num_warps={value} must be <= 16")
        if value > MAX_BLOCK:
            raise ValueError(f"{op} config {key}={value} must be <= {MAX_BLOCK}")
    if op == "arrow_select" and ("BLOCK" in config) != ("CAP" in config):
        raise ValueError(
            "arrow_select config gives BLOCK and CAP together (CAP >= BLOCK: a block's survivors must fit)"
        )
    if op == "arrow_select" and "BLOCK" in config and config["CAP"] < config["BLOCK"]:
        raise ValueError(f"arrow_select config CAP={config['CAP']} must be >= BLOCK={config['BLOCK']}")
    return dict(config)


def load_table(path: str | Path) -> dict:
    """Read and check a table file. Raises ValueError naming the file and the entry that is wrong."""
    path = Path(path)
    try:
        table = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"tuning table {path}: cannot read it ({e})") from None
    if (
        not isinstance(table, dict)
        or not isinstance(table.get("card"), str)
        or not isinstance(table.get("entries"), list)
    ):
        raise ValueError(f"tuning table {path}: expected an object with 'card' (str) and 'entries' (list)")
    for i, entry in enumerate(table["entries"]):
        try:
            if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
                raise ValueError("an entry is an object with 'op' and 'config'")
            check_config(entry.get("op"), entry["config"])
            for key, value in entry.items():
                if key in _NOT_SHAPE:
                    continue
                if key not in OP_SHAPES[entry["op"]]:
                    raise ValueError(f"{entry['op']} is looked up by {sorted(OP_SHAPES[entry['op']])}, not {key!r}")
                if isinstance(value, list):
                    if len(value) != 2 or not all(isinstance(v, int) for v in value) or value[0] > value[1]:
                        raise ValueError(f"range {key}={value!r} must be [lo, hi] ints with lo <= hi")
                elif not isinstance(value, int):
                    raise ValueError(f"key {key}={value!r} must be an int or an [lo, hi] range")
        except ValueError as e:
            raise ValueError(f"tuning table {path}, entry {i}: {e}") from None
    return table


@functools.cache
def _table_for(card: str, env_path: str | None) -> tuple[dict, ...]:
    path = Path(env_path) if env_path else TABLE_DIR / f"{card_slug(card)}.json"
    if not path.is_file():
        if env_path:
            raise ValueError(f"{ENV_TABLE}={env_path}: no such file")
        return ()
    table = load_table(path)
    return tuple(table["entries"]) if table["card"] == card else ()


def _matches(entry: dict, op: str, shape: dict) -> bool:
    if entry["op"] != op:
        return False
    for key, want in entry.items():
        if key in _NOT_SHAPE:
            continue
        if key not in shape:
            return False
        have = shape[key]
        if isinstance(want, list) and not want[0] <= have <= want[1]:
            return False
        if isinstance(want, int) and have != want:
            return False
    return True


def tuned(op: str, device: torch.device, default: dict, **shape: int) -> dict:
    """The launch config of ``op`` for these shape sizes on ``device``'s card: ``default`` with what
    a matching table entry (or ``forced``) sets over it (an entry may set only some keys)."""
    if op in _forced:
        return {**default, **_forced[op]}
    if device.type != "cuda":
        return dict(default)
    card = _card_name(device.index if device.index is not None else torch.cuda.current_device())
    return {**default, **(lookup(_table_for(card, os.environ.get(ENV_TABLE) or None), op, **shape) or {})}


@functools.cache
def _card_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def lookup(entries, op: str, **shape: int) -> dict | None:
    """The config of the first entry of ``entries`` that matches ``op`` and the shape sizes, or None."""
    for entry in entries:
        if _matches(entry, op, shape):
            return dict(entry["config"])
    return None


@contextlib.contextmanager
def forced(op: str, config: dict) -> Iterator[None]:
    """Launch ``op`` with ``config`` inside the block, whatever the table says (for the tuning script)."""
    previous = _forced.get(op)
    _forced[op] = check_config(op, config)
    try:
        yield
    finally:
        if previous is None:
            _forced.pop(op, None)
        else:
            _forced[op] = previous


def all_table_configs() -> list[tuple[str, dict, dict]]:
    """(op, config, entry) of every table shipped in ``tuned/`` (for the AOT compile check)."""
    out = []
    for path in sorted(TABLE_DIR.glob("*.json")) if TABLE_DIR.is_dir() else []:
        for entry in load_table(path)["entries"]:
            out.append((entry["op"], dict(entry["config"]), entry))
    return out
