"""Data-free alignment of LoRA adapters (DESIGN §1): thin SVD of dW = s·B A without forming dW.

    A^T = Qa Ra,  B = Qb Rb,  s·Rb Ra^T = Uc S Vc^T   =>   dW = (Qb Uc) S (Qa Vc)^T = U S V^T
    A* = V^T (orthonormal rows, sigma descending),  B* = U S,  prototype = A*[0].

Cost per adapter and module is two thin QRs (d × r) and one r × r SVD, in float64.
"""

from __future__ import annotations

import torch


def align_lora(a: torch.Tensor, b: torch.Tensor, scaling: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align a batch of LoRA factors of one rank.

    Args:
        a: [M, r, d_in] lora_A weights.
        b: [M, d_out, r] lora_B weights.
        scaling: [M] LoRA scalings s (lora_alpha / r, or / sqrt(r) with rsLoRA).

    Returns:
        (a_star [M, r, d_in], b_star [M, d_out, r]) in float64 with b_star @ a_star == s·B A.
        Signs are fixed so that each row of A* has its largest-magnitude entry positive (the
        first such entry on ties), which makes builds deterministic.
    """
    a, b = a.double(), b.double()
    q_a, r_a = torch.linalg.qr(a.transpose(1, 2))  # [M, d_in, r], [M, r, r]
    q_b, r_b = torch.linalg.qr(b)  # [M, d_out, r], [M, r, r]
    core = scaling.double()[:, None, None] * (r_b @ r_a.transpose(1, 2))
    u_c, sigma, vh_c = torch.linalg.svd(core)
    u = q_b @ u_c  # [M, d_out, r]
    v = q_a @ vh_c.transpose(1, 2)  # [M, d_in, r]
    peak = v.abs().argmax(dim=1, keepdim=True)  # [M, 1, r]
    sign = torch.where(v.gather(1, peak) < 0, -1.0, 1.0).to(v.dtype)
    return (v * sign).transpose(1, 2).contiguous(), (u * (sign * sigma[:, None, :])).contiguous()
