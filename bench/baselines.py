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
    """|x . p| in fp32; under a scope, disallowed adapters scored -1 (below every |x . p|)."""
    scores = _mm32(x, prototypes.T).abs()
    return scores if allowed is None else scores.masked_fill(~allowed[scope.long()], -1.0)


def plain_arrow_topk(x, prototypes, k, allowed=None, scope=None):
    top = _plain_scores(x, prototypes, allowed, scope).topk(k, dim=1)
    return top.indices.to(torch.int32), top.values


def plain_spectr_rerank(x, a_star, cand, top_m):
    cand = cand.long()
    z = _plain_z(x, a_star, cand)
    best = z.norm(dim=-1).topk(top_m, dim=1).indices
    sel = cand.gather(1, best)
    z_sel = z.gather(1, best[..., None].expand(-1, -1, z.shape[-1]))
    w = torch.full(sel.shape, 1.0 / top_m, dtype=torch.float32, device=x.device)
    return sel.to(torch.int32), w, z_sel


def plain_lora_apply(y, b_star, sel, w, z):
    y += torch.einsum("tmor,tmr->to", b_star[sel.long()], (z * w[..., None]).to(y.dtype))
    return y


def plain_layer(x, y, a_star, b_star, prototypes, k, top_m, allowed=None, scope=None):
    cand = _plain_scores(x, prototypes, allowed, scope).topk(k, dim=1).indices  # [T, k]
    z = _plain_z(x, a_star, cand)  # [T, k, r] fp32
    best = z.norm(dim=-1).topk(top_m, dim=1).indices  # [T, m]
    sel = cand.gather(1, best)
    z_sel = z.gather(1, best[..., None].expand(-1, -1, z.shape[-1]))
    y += torch.einsum("tmor,tmr->to", b_star[sel], z_sel.to(y.dtype))
    return sel


PLAIN = {
    "arrow_topk": plain_arrow_topk,
    "spectr_rerank": plain_spectr_rerank,
    "lora_apply": plain_lora_apply,
    "layer": plain_layer,
}
