"""``lag_triton.scope``: per-request adapter sets. Each batch row may only use its own adapters.

In a shared deployment each request may only use its own tenant's (or access level's)
documents. Inside ``with lag_triton.scope(model, allowed):`` every patched layer routes the
tokens of batch row b among the adapters ``allowed`` gives row b, and no others: the scope is
enforced inside Arrow retrieval (a disallowed adapter is never a candidate, for every router and
top_m; the "spectr" router reranks only the allowed ones). A row with fewer than k allowed
adapters gets fewer candidates, and a row with none gets no adapter output at all (the base
model). Traces show it: a pick that found no adapter is -1.

``allowed`` is one entry per batch row, each None (every adapter) or a collection of adapter
names (several libraries: each library uses the names it has; a name no library has is an error)
or of integer indices into the library's ``names`` (one library only; Python, numpy or torch
integers, a 1-D integer array or tensor), or a 1-D bool tensor / array [N] (one library only); or
a bool tensor [B, N] (one library only); or a dict {library index: one of those} (libraries in
the order they were attached; in it each library's names must be its own; a library left out is
unrestricted, so ``{}`` restricts nothing). Integer indices and bool masks say nothing about
which library they index, so with several libraries they must come in the dict form.

Tokens belong to rows by the layer input's shape. An input of 3 or more dimensions, x [B, S, d_in]
(what Hugging Face models feed most linear layers, in prefill and in cached decoding alike), has
its batch rows in the leading dimension: S tokens per row (generate with ``num_beams`` or
``num_return_sequences`` repeats each row, so the scope needs an entry per repeated row). A 2-D
input x [T, d_in] is the batch flattened row-major, as ``x.view(-1, d_in)`` gives (Qwen2-MoE's
shared expert): T must be a multiple of B, and row b owns tokens b*T/B .. (b+1)*T/B - 1. In cached
decoding (S = 1) that is T = B, one token per row, the same as a 2-D [B, d_in] input with a row
per token, so both readings agree. The experts of a mixture-of-experts block kept as 3-D
parameters (:mod:`.moe`) are each fed a gather of the tokens routed to them: their wrapper tells
the scope which of the batch's tokens those are, and each token keeps its row's set. Where
transformers keeps experts as separate linear layers (``...experts.<i>...``, older releases), the
MoE block gathers the tokens itself and no shape tells their rows: a scope restricting one is refused.
The scoped model's own call is checked too, where it is given ``input_ids`` / ``inputs_embeds``
(or the decoder's): their batch size must be the scope's, and in a decoder-only model a 2-D layer
input must hold all of the call's B * S tokens (a block fed some of them is refused).

A scope covers every forward of the model while it is open, whichever thread runs it (``generate``
started in a thread beside a streamer included). So one thread, and in it one task (asyncio task,
or other ``contextvars`` context), at a time may hold scopes on a model: a scope opened while
another thread's or task's is open on any of the same layers raises, before changing anything,
instead of routing one request's tokens by another request's adapter sets. A task may nest scopes
inside the ones it holds or was started under. Concurrent requests share a model by being batched
into one scope (a row each).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import numbers
import re
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import nn

__all__ = ["scope"]

_OPENING = threading.Lock()  # taken while a scope is installed on, or removed from, a model's layers
# The scopes open in the current context (its own and those of the context it was copied from, as
# an asyncio task inherits its creator's): a thread id alone cannot tell two tasks of one event loop
# apart, and a context sees only what its own ``with`` blocks (and its creator's, up to its
# creation) opened.
_HELD: contextvars.ContextVar[frozenset] = contextvars.ContextVar("lag_triton_scopes_held", default=frozenset())
# layer -> its open scopes, innermost last. Kept here, not on the layer, so that a copy of a layer
# (deepcopy, pickle) is under no scope; exits remove their own entry, whatever order they come in.
_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Per-expert layers of transformers' mixture-of-experts blocks kept as nn.Linear are fed
# hidden_states[token_idx] for the tokens routed to that expert, in an order the shape cannot tell
# (those kept as 3-D parameters are run by lag_triton.moe, which tells the scope).
_SERIALS = itertools.count(1)  # scope serial numbers
_GATHERED = re.compile(r"(?:^|\.)experts\.\d+\.")


# (rows, tokens) of the scoped model's call running in this thread and task, where a decoder-only
# model was called with input_ids / inputs_embeds [B, S, ...]: a 2-D input must hold all B * S tokens
# (a block fed some of them, as Ernie-4.5-VL's text and vision experts are, would take wrong rows)
_CALL: contextvars.ContextVar = contextvars.ContextVar("lag_triton_scoped_call", default=None)
_BATCH_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds", "input_ids", "inputs_embeds")


def _call_batch(args, kwargs) -> tuple[str, torch.Tensor] | None:
    """(name, tensor) of the batch a model was called with: its (decoder's) token ids or embeddings."""
    for key in _BATCH_INPUTS:
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return key, t
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 2 and not args[0].is_floating_point():
        return "input_ids", args[0]  # model(input_ids) positionally
    return None


def _repeated_hint(given: int, rows: int) -> str:
    if rows > given and rows % given == 0:
        return (
            f". generate with num_beams or num_return_sequences = {rows // given} repeats each row: give "
            f"one entry per repeated row ([entry for entry in allowed for _ in range({rows // given})])"
        )
    return ""


class _ScopeMasks:
    """The masks of one scope, per patched route: allowed [B, N_module] bool on the route's device."""

    def __init__(self, rows: int | None, masks: dict[int, torch.Tensor]) -> None:
        self.thread = threading.get_ident()  # the thread that opened the scope
        self.serial = next(_SERIALS)  # tells it from other scopes in a checkpoint's recomputation (_ScopeTag)
        self.rows = rows  # None: no library restricted (then no route has a mask)
        self._masks = masks  # id(LibraryRoute) -> mask; routes of unrestricted libraries are absent
        self._token_rows: dict[tuple, torch.Tensor] = {}
        self._repeated: dict[tuple, bool] = {}

    def for_route(self, route: nn.Module, x: torch.Tensor, layer_name: str, gathered=None):
        """(allowed [B, N] bool, scope [T] int32) for the tokens of ``x`` (rule in the module docstring);
        ``gathered`` (batch, index): x is batch[index], the tokens an MoE block sends one expert."""
        mask = self._masks.get(id(route))
        if mask is None:
            return None, None
        if gathered is not None:
            batch, index = gathered
            mask, rows = self.for_route(route, batch, layer_name)
            return mask, rows[index]
        d_in = max(1, x.shape[-1]) if x.dim() else 1
        stride = 1  # scope rows per input row
        if x.dim() >= 3:
            rows = x.shape[0]
            if rows != self.rows and self._repeats_rows(route, mask, rows):
                # an encoder-decoder's encoder runs on the batch's own rows, its decoder on them repeated
                # (num_beams / num_return_sequences): input row i is scope row i * stride, whose copies
                # all give the same set
                stride = self.rows // rows
            elif rows != self.rows:
                raise ValueError(
                    f"lag_triton.scope was given {self.rows} batch rows, but layer {layer_name!r} got "
                    f"an input of shape {tuple(x.shape)} ({rows} rows){_repeated_hint(self.rows, rows)}"
                )
            per_row = x.numel() // max(1, rows * d_in)
        else:
            tokens = x.numel() // d_in
            call = None if torch.compiler.is_compiling() else _CALL.get()  # compiled: set by no call (_enter_call)
            if call is not None and tokens != call[1]:
                raise ValueError(
                    f"lag_triton.scope cannot tell the batch rows of layer {layer_name!r}'s tokens: it got a "
                    f"flattened input of {tokens} tokens, and the batch has {call[1]} ({call[0]} rows); a block "
                    "fed some of the batch's tokens (Ernie-4.5-VL's text and vision experts, say) cannot be scoped"
                )
            if tokens % self.rows:
                raise ValueError(
                    f"lag_triton.scope was given {self.rows} batch rows, but layer {layer_name!r} got a flattened "
                    f"input of shape {tuple(x.shape)}: {tokens} tokens, not a whole number per row (a 2-D input "
                    "is read as the batch flattened row-major, [B * S, d_in])"
                )
            per_row = tokens // self.rows
        key = (per_row, stride, mask.device)
        token_rows = self._token_rows.get(key)
        if token_rows is None:
            rows = torch.arange(0, self.rows, stride, dtype=torch.int32, device=mask.device)
            token_rows = rows.repeat_interleave(per_row)
            self._token_rows[key] = token_rows
        return mask, token_rows

    def _repeats_rows(self, route: nn.Module, mask: torch.Tensor, rows: int) -> bool:
        """Whether this scope's rows are ``rows`` sets each repeated self.rows // rows times in a row
        (one host read per route and row count, cached: the sets are fixed while the scope is open)."""
        if rows == 0 or self.rows % rows:
            return False
        key = (id(route), rows)
        found = self._repeated.get(key)
        if found is None:
            groups = mask.view(rows, self.rows // rows, -1)
            found = self._repeated[key] = bool((groups == groups[:, :1]).all())
        return found


def _index(item) -> int | None:
    """An adapter index from a Python, numpy or 0-d torch integer (not a bool), else None."""
    if isinstance(item, torch.Tensor):
        integer = not (item.is_floating_point() or item.is_complex() or item.dtype == torch.bool)
        return int(item.item()) if item.dim() == 0 and integer else None
    if isinstance(item, numbers.Integral) and not isinstance(item, bool):
        return int(item)
    return None


def _row(entry, b: int):
    """One row entry, read once (it may be a generator, used by every library): None, a list of
    items, or a bool tensor [N]."""
    if entry is None:
        return None
    array = entry if isinstance(entry, torch.Tensor) else None
    if array is None and hasattr(entry, "__array__") and hasattr(entry, "dtype"):  # numpy, without importing it
        if getattr(entry.dtype, "kind", None) in ("b", "i", "u", "f", "c"):
            array = torch.as_tensor(entry)
        elif getattr(entry, "ndim", 1) == 1:  # names (str / object)
            return list(entry.tolist())
        else:
            raise TypeError(f"scope row {b}: an array row must be 1-D, got shape {tuple(entry.shape)}")
    if array is not None:
        if array.dim() != 1:
            raise TypeError(
                f"scope row {b}: an array or tensor row must be 1-D (adapter indices, or a bool mask over the "
                f"library's adapters), got shape {tuple(array.shape)}"
            )
        if array.dtype == torch.bool:
            return array.cpu()
        if array.is_floating_point() or array.is_complex():
            raise TypeError(f"scope row {b}: adapter indices must be integers, got {array.dtype} values")
        return array.cpu().tolist()
    if isinstance(entry, (str, bytes)) or not isinstance(entry, Iterable):
        raise TypeError(
            f"scope row {b}: a scope row must be None or a collection of adapter names or indices, got {entry!r}"
        )
    return list(entry)


def _rows(spec):
    """A library's spec, read once: a bool tensor [B, N], or a list of rows (see ``_row``)."""
    if isinstance(spec, torch.Tensor):
        return spec
    if isinstance(spec, (str, bytes, Mapping)) or not isinstance(spec, Iterable):
        raise TypeError(
            "scope() takes one entry per batch row (a list), a bool tensor [B, N], or a dict "
            f"{{library index: rows}}; got {type(spec).__name__}"
        )
    rows = [_row(entry, b) for b, entry in enumerate(spec)]
    if not rows:
        raise ValueError("scope() needs at least one batch row")
    return rows


# integer indices and bool masks index one library's names: which one is not said
_AMBIGUOUS = (
    "with several libraries, {what} is ambiguous (which library's adapters?): pass a dict {{library index: {form}}}"
)


def _row_mask(row, b: int, names: list[str], library: int, several: bool) -> tuple[torch.Tensor, set[str]]:
    """(bool [N_library] of one batch row in one library, the names in it this library lacks)."""
    n = len(names)
    if row is None:
        return torch.ones(n, dtype=torch.bool), set()
    if isinstance(row, torch.Tensor):
        if several:
            raise TypeError(f"scope row {b}: " + _AMBIGUOUS.format(what="a bool mask row", form="rows"))
        if row.shape[0] != n:
            raise ValueError(
                f"scope row {b}: a bool mask row for library {library} needs {n} entries, got {row.shape[0]}"
            )
        return row, set()
    mask = torch.zeros(n, dtype=torch.bool)
    where = {name: i for i, name in enumerate(names)}
    unknown = set()
    for item in row:
        if isinstance(item, str):
            if item in where:
                mask[where[item]] = True
            else:
                unknown.add(str(item))
            continue
        index = _index(item)
        if index is None:
            raise TypeError(f"scope row {b}: a scope row holds adapter names (str) or indices (int), got {item!r}")
        if several:
            raise TypeError(f"scope row {b}: " + _AMBIGUOUS.format(what="an integer index", form="rows"))
        if not 0 <= index < n:
            raise ValueError(
                f"scope row {b}: adapter index {index} is out of range for library {library} ({n} adapters)"
            )
        mask[index] = True
    return mask, unknown


def _library_mask(rows, names: list[str], library: int, several: bool) -> tuple[torch.Tensor, list[set[str]]]:
    """(one library's [B, N_library] bool mask, per row the names this library lacks)."""
    if isinstance(rows, torch.Tensor):
        if several:
            raise TypeError("scope() got a bool tensor [B, N]: " + _AMBIGUOUS.format(what="a mask", form="mask [B, N]"))
        if rows.dtype != torch.bool or rows.dim() != 2 or rows.shape[1] != len(names):
            raise ValueError(
                f"a scope mask for library {library} must be bool [B, N={len(names)}], got "
                f"{rows.dtype} {tuple(rows.shape)}"
            )
        if rows.shape[0] == 0:
            raise ValueError("scope() needs at least one batch row")
        return rows.cpu(), [set()] * rows.shape[0]
    per_row = [_row_mask(row, b, names, library, several) for b, row in enumerate(rows)]
    return torch.stack([mask for mask, _ in per_row]), [unknown for _, unknown in per_row]


def _resolve(allowed, library_names: dict[int, list[str]]) -> dict[int, torch.Tensor]:
    """library index -> [B, N_library] bool (CPU), checking every name exists."""
    several = len(library_names) > 1
    masks = {}
    if isinstance(allowed, Mapping):
        unknown = set(allowed) - set(library_names)
        if unknown:
            raise ValueError(
                f"scope() got libraries {sorted(unknown, key=repr)}; the model has {sorted(library_names)}"
            )
        for lib, spec in allowed.items():
            masks[lib], lacking = _library_mask(_rows(spec), library_names[lib], lib, False)
            missing = sorted(set().union(*lacking))
            if missing:
                raise ValueError(f"scope() names adapters that library {lib} does not have: {missing[:10]}")
    else:
        rows = _rows(allowed)  # read once: a generator would be used up by the first library
        lacking = {}
        for lib, names in library_names.items():
            masks[lib], lacking[lib] = _library_mask(rows, names, lib, several)
        missing = sorted(set.intersection(*(set().union(*per_row) for per_row in lacking.values())))
        if missing:
            raise ValueError(f"scope() names adapters that no attached library has: {missing[:10]}")
    sizes = {m.shape[0] for m in masks.values()}
    if len(sizes) > 1:
        raise ValueError(f"scope() got different batch sizes per library: {sorted(sizes)}")
    return masks


class _ScopeTag(torch.autograd.Function):
    """y, passed through, tagged with the serial number of the scope its layer's forward ran under.
    Gradient checkpointing drops a forward's saved tensors and runs the forward again inside
    backward() to make them: the tag made then holds the scope in force then. Its backward refuses
    another than the forward's, whose picks (and so gradients) it would be (the common case:
    backward() after the scope's block). Reentrant checkpointing runs the first forward without
    gradients, so no tag: not checked."""

    @staticmethod
    def forward(ctx, y, tag, serial, name):
        ctx.save_for_backward(tag)
        ctx.serial, ctx.name = serial, name
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (tag,) = ctx.saved_tensors
        if int(tag) != ctx.serial:  # a CPU tensor: no device sync
            raise RuntimeError(
                f"{ctx.name}: backward() ran this layer's forward again (gradient checkpointing) under another "
                "lag_triton.scope than its forward's, or under none: the routed picks would differ from the "
                "forward's. Call backward() inside the scope's block"
            )
        return grad, None, None, None


def tag_with_scope(y: torch.Tensor, scope: _ScopeMasks, name: str) -> torch.Tensor:
    """``y`` (a scoped layer's output, gradients on) tagged by :class:`_ScopeTag`. Unscoped outputs
    are not tagged (a sharded route's is a view that may not change in place; and training without
    scopes pays nothing), so a forward run again under a scope where it ran under none is not caught."""
    return _ScopeTag.apply(y, torch.tensor(scope.serial), scope.serial, name)


class _CallHook:
    """The scoped model's forward pre-hook (``pre``: checks the call against ``state``) or post-hook
    while the block is open. Not a closure: a model pickled or deep-copied inside the block copies
    its hooks, and a copy of this one is inert (``state`` None: the copy is in no scope, and the
    block's exit removes the original's hooks alone)."""

    def __init__(self, state: _ScopeMasks | None, pre: bool):
        self.state, self.pre = state, pre

    def __reduce__(self):
        return _CallHook, (None, self.pre)

    def __call__(self, model: nn.Module, args, kwargs, out=None) -> None:
        if self.state is None:
            return
        if self.pre:
            _enter_call(self.state, model, args, kwargs)
        elif not torch.compiler.is_compiling():
            _CALL.set(None)


def _enter_call(state: _ScopeMasks, model: nn.Module, args, kwargs) -> None:
    """Refuse a call whose batch has other than the scope's rows (layers whose inputs do not show the
    rows, as an MoE layer's experts, could not), and note its tokens for the layers' 2-D inputs
    (eagerly: dynamo cannot trace a context variable's set, so a compiled call does not check those)."""
    batch = _call_batch(args, kwargs)
    if batch is None:
        return
    name, t = batch
    if t.shape[0] != state.rows:
        raise ValueError(
            f"lag_triton.scope was given {state.rows} batch rows, but {type(model).__name__} was called with "
            f"{name} of shape {tuple(t.shape)} ({t.shape[0]} rows){_repeated_hint(state.rows, t.shape[0])}"
        )
    if torch.compiler.is_compiling():
        return
    decoder_only = not any(key.startswith("decoder_") for key in kwargs if kwargs[key] is not None)
    _CALL.set((t.shape[0], t.shape[0] * t.shape[1]) if decoder_only else None)


def _holder_error(model: nn.Module, other_thread: bool) -> RuntimeError:
    who, each = ("another thread", "thread") if other_thread else ("another task (asyncio task or context)", "task")
    return RuntimeError(
        f"{who} holds a lag_triton.scope on this {type(model).__name__}: a scope covers every forward of "
        f"the model, whichever thread runs it, so two {each}s cannot scope it at once (each request's "
        f"tokens would be routed by the other's adapter sets). Batch concurrent requests into one scope "
        f"(a row each), or give each {each} its own model"
    )


@contextlib.contextmanager
def scope(model: nn.Module, allowed) -> Iterator[None]:
    """Restrict, per batch row, the adapters each token may be routed to (see the module docstring).

    Scopes nest: an inner block replaces the outer one for its duration, and each block's exit
    removes its own scope (blocks of tasks that outlive their creator's may close in any order).
    The model is the one ``patch`` was called on; calls inside the block must have as many batch
    rows as ``allowed``.
    """
    from .patching import LagLinear, _uncompiled, check_patched_root, patched_root

    if not isinstance(model, nn.Module):
        raise TypeError(f"scope() needs a torch.nn.Module, got {type(model).__name__}")
    model = _uncompiled(model)
    layers = [m for m in model.modules() if isinstance(m, LagLinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LAG-patched modules; call lag_triton.patch first")
    root = patched_root(model, "scope")
    if root is None:
        check_patched_root(model, "scope")  # patched through a module that contains this one: raises
    library_names = root._lag_library_names
    masks = _resolve(allowed, library_names)
    rows = next(iter(masks.values())).shape[0] if masks else None
    per_route = {}
    for layer in layers:
        for route in layer.routes:
            mask = masks.get(route.library_index)
            if mask is not None:
                if _GATHERED.search(layer.module_name + "."):
                    raise ValueError(
                        f"lag_triton.scope cannot restrict layer {layer.module_name!r} (library "
                        f"{route.library_index}): a mixture-of-experts block feeds each expert's layers a "
                        "gather of the tokens routed to it, in which no shape tells the batch rows. Leave "
                        "that library unrestricted (the dict form), or attach one that targets no expert layer"
                    )
                ids = route.adapter_ids.long().cpu()
                per_route[id(route)] = mask[:, ids].to(route.a_star.device)
    state = _ScopeMasks(rows, per_route)
    held = _HELD.get()
    with _OPENING:  # check and set at once: two threads opening scopes together cannot both pass
        in_force = {layer._scope for layer in layers if layer._scope is not None}
        if any(s.thread != state.thread for s in in_force):
            raise _holder_error(model, other_thread=True)
        if not in_force <= held:
            raise _holder_error(model, other_thread=False)
        for layer in layers:
            _STACKS.setdefault(layer, []).append(state)
            layer._scope = state
    token = _HELD.set(held | {state})
    hooks = []
    if rows is not None:
        hooks = [
            model.register_forward_pre_hook(_CallHook(state, pre=True), with_kwargs=True),
            model.register_forward_hook(_CallHook(state, pre=False), with_kwargs=True, always_call=True),
        ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        try:
            _HELD.reset(token)
        except ValueError:  # exited in another context than it was entered in: that one is not ours to change
            pass
        with _OPENING:
            for layer in layers:
                stack = [s for s in _STACKS.get(layer, ()) if s is not state]
                _STACKS[layer] = stack
                layer._scope = stack[-1] if stack else None
