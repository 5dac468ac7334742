"""The plain-PyTorch baselines: what a user would write without our kernels (deliberately not our
reference, ``lag_triton.kernels.reference``), timed beside our backends in the same run as
``plain`` and, under ``torch.compile(dynamic=False)``, ``plain-compile`` (bench/harness.py).
"""

from __future__ import annotations

import torch

# Scores and z are ranked in fp32, as the reference ranks them (docs/design.md §1): torch.mm / torch.bmm with
# out_dtype=fp32 where this torch has it for the device and dtype (CUDA bf16/fp16), else an upcast.
FP32_OUT: dict = {}  # (device type, dtype) -> does mm/bmm(out_dtype=torch.float32) work? (probe_fp32_out)


def probe_fp32_out(device: torch.device, dtype: torch.dtype) -> bool:
    """Fill FP32_OUT for (device, dtype); call before the plain functions (and before compiling them)."""
    key = (device.type, dtype)
    if key not in FP32_OUT:
        try:
            a = torch.ones(1, 2, 2, device=device, dtype=dtype)
            torch.bmm(a, a, out_dtype=torch.float32)
            torch.mm(a[0], a[0], out_dtype=torch.float32)
            FP32_OUT[key] = True
        except (RuntimeError, NotImplementedError, TypeError):  # CPU: "Could not run 'aten::mm.dtype'"
            FP32_OUT[key] = False
    return FP32_OUT[key]


def _mm32(a, b):
    """a @ b (2-D, or batched 3-D) with fp32 results."""
    if FP32_OUT.get((a.device.type, a.dtype)):
        return (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def _plain_z(x, a_star, cand):
    """z [T, k, r] fp32 = A*[cand] x (gathers the candidates' A*: [T, k, r, d_in])."""
    t, k = cand.shape
    r, d_in = a_star.shape[1], a_star.shape[2]
    return _mm32(a_star[cand].reshape(t, k * r, d_in), x[:, :, None]).view(t, k, r)


def _plain_scores(x, prototypes, allowed=None, scope=None):
    """|x . p| in fp32; under a scope, disallowed adapters scored -inf (never candidates: see below)."""
    scores = _mm32(x, prototypes.T).abs()
    return scores if allowed is None else scores.masked_fill(~allowed[scope.long()], float("-inf"))


def _plain_candidates(x, prototypes, k, allowed=None, scope=None):
    """(idx [T, k], scores [T, k]) of the k best; under a scope, -1 past a token's allowed adapters."""
    top = _plain_scores(x, prototypes, allowed, scope).topk(k, dim=1)
    if allowed is None:
        return top.indices, top.values
    return top.indices.masked_fill(top.values == float("-inf"), -1), top.values


def plain_arrow_topk(x, prototypes, k, allowed=None, scope=None):
    idx, values = _plain_candidates(x, prototypes, k, allowed, scope)
    return idx.to(torch.int32), values if allowed is None else values.masked_fill(idx < 0, float("nan"))


def _plain_picks(x, a_star, cand, top_m, scoped=False):
    """(sel [T, m], z [T, m, r] fp32, their norms [T, m]): the top_m candidates by ||A* x||. ``scoped``:
    cand may hold -1 (past a token's allowed adapters), never picked over an adapter (a -1 pick stays -1)."""
    z = _plain_z(x, a_star, cand.clamp(min=0) if scoped else cand)
    norms = z.norm(dim=-1)
    if scoped:
        norms = norms.masked_fill(cand < 0, float("-inf"))
    top = norms.topk(top_m, dim=1)
    sel = cand.gather(1, top.indices)
    return sel, z.gather(1, top.indices[..., None].expand(-1, -1, z.shape[-1])), top.values


def _plain_weights(norms, sel):
    """The reference's weights (combine="softmax", temperature 1): 1 for one pick, else the softmax of the
    picks' norms; 0 for a -1 pick."""
    if norms.shape[1] == 1:
        return (sel >= 0).float()
    return torch.softmax(norms, dim=1).nan_to_num(0.0)  # every pick -1: all -inf, NaN


def plain_spectr_rerank(x, a_star, cand, top_m):
    """The op on unscoped candidates (no -1: what the kernel tables give it)."""
    sel, z_sel, norms = _plain_picks(x, a_star, cand.long(), top_m)
    return sel.to(torch.int32), _plain_weights(norms, sel), z_sel


def plain_lora_apply(y, b_star, sel, w, z):
    y += torch.einsum("tmor,tmr->to", b_star[sel.long()], (z * w[..., None]).to(y.dtype))
    return y


def plain_layer(x, y, a_star, b_star, prototypes, k, top_m, allowed=None, scope=None):
    cand, _ = _plain_candidates(x, prototypes, k, allowed, scope)  # [T, k]
    sel, z_sel, norms = _plain_picks(x, a_star, cand, top_m, allowed is not None)  # [T, m], [T, m, r] fp32
    if top_m > 1 or allowed is not None:  # else every token's one pick has weight 1
        z_sel = z_sel * _plain_weights(norms, sel)[..., None]
    y += torch.einsum("tmor,tmr->to", b_star[sel.clamp(min=0) if allowed is not None else sel], z_sel.to(y.dtype))
    return sel


PLAIN = {
    "arrow_topk": plain_arrow_topk,
    "spectr_rerank": plain_spectr_rerank,
    "lora_apply": plain_lora_apply,
    "layer": plain_layer,
}
