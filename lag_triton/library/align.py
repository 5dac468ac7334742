"""Data-free alignment of LoRA adapters (docs/design.md §1): thin SVD of dW = s·B A without forming dW.

    A^T = Qa Ra,  B = Qb Rb,  s·Rb Ra^T = Uc S Vc^T   =>   dW = (Qb Uc) S (Qa Vc)^T = U S V^T
    A* = V^T = (Ra^-1 Vc)^T A   (orthonormal rows, sigma descending)
    B* = U S = B (Rb^-1 Uc S)   (scaling folded in);   prototype = A*[0].

Only the r × r triangular factors Ra, Rb are needed, never Qa, Qb: A* and B* are small r × r
transforms of A and B. Ra and Rb come from Cholesky of the Gram matrices A A^T and B^T B (two
skinny matmuls) when the factors are well conditioned, which makes a build memory-bound; a
batch with a rank-deficient or ill-conditioned factor (e.g. PEFT's zero-initialised B) falls back
to Householder QR. Everything runs in float64.
"""

from __future__ import annotations

import torch

# Cholesky-QR loses accuracy as cond(factor)^2 · eps; past this cond it falls back to Householder.
_MAX_GRAM_COND = 1e3


def _orthogonalise(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """m [M, d, r] tall = Q R. Returns (R, None) from Cholesky-QR when every m in the batch is well
    conditioned (Q = m R^-1 is then never formed), else (R, Q) from Householder QR.

    The condition number is the Gram matrix's own (its eigenvalues, r x r each): the spread of the
    Cholesky diagonal does not bound it (a Kahan-like A, unit diagonal and -1 above it, passed that
    test at cond 1.5e9 and A*'s rows came out far from orthonormal: SpectR's norms were wrong)."""
    gram = m.transpose(1, 2) @ m
    lower, info = torch.linalg.cholesky_ex(gram)
    if not bool(info.any()):
        eig = torch.linalg.eigvalsh(gram)  # ascending: cond(m)^2 = largest / smallest
        if bool((eig[:, 0] * _MAX_GRAM_COND**2 > eig[:, -1]).all()):
            return lower.transpose(1, 2), None
    q, r = torch.linalg.qr(m)
    return r, q


def align_lora(a: torch.Tensor, b: torch.Tensor, scaling: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align a batch of LoRA factors of one rank.

    Args:
        a: [M, r, d_in] lora_A weights.
        b: [M, d_out, r] lora_B weights.
        scaling: [M] LoRA scalings s (lora_alpha / r, or / sqrt(r) with rsLoRA).

    Returns:
        (a_star [M, k, d_in], b_star [M, d_out, k]) in float64 with b_star @ a_star == s·B A, where
        k = min(r, d_in, d_out) (a rank above the layer's size adds nothing: B A has rank <= k).
        Signs are fixed so that each row of A* has its largest-magnitude entry positive (the
        first such entry on ties), which makes builds deterministic.

    Raises:
        ValueError if a factor holds NaN or inf.
    """
    a, b = a.double(), b.double()
    r_a, q_a = _orthogonalise(a.transpose(1, 2))
    r_b, q_b = _orthogonalise(b)
    core = scaling.double()[:, None, None] * (r_b @ r_a.transpose(1, 2))
    if not bool(torch.isfinite(core).all()):
        raise ValueError("LoRA factors contain NaN or inf")
    u_c, sigma, vh_c = torch.linalg.svd(core, full_matrices=False)  # k singular triplets
    v_c, u_sigma = vh_c.transpose(1, 2), u_c * sigma[:, None, :]
    if q_a is None:  # V = Qa Vc = A^T (Ra^-1 Vc)
        a_star = torch.linalg.solve_triangular(r_a, v_c, upper=True).transpose(1, 2) @ a
    else:
        a_star = (q_a @ v_c).transpose(1, 2)
    if q_b is None:  # U S = Qb Uc S = B (Rb^-1 Uc S)
        b_star = b @ torch.linalg.solve_triangular(r_b, u_sigma, upper=True)
    else:
        b_star = q_b @ u_sigma
    peak = a_star.abs().argmax(dim=2, keepdim=True)  # [M, r, 1]
    sign = torch.where(a_star.gather(2, peak) < 0, -1.0, 1.0).to(a_star.dtype)
    return (a_star * sign).contiguous(), (b_star * sign.transpose(1, 2)).contiguous()
