"""Compile every Triton kernel of this backend for an NVIDIA target without a GPU (CI guard).

    python -m lag_triton.kernels.triton._aot_check [capability=90]

Runs the full Triton pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for the
configurations the launchers pick, so a kernel that only works under TRITON_INTERPRET=1 fails
here. Must run with TRITON_INTERPRET unset (the interpreter swaps the top-k implementation).
"""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import arrow_topk as _unused  # noqa: F401  (ensure modules are imported)

A = sys.modules[__package__ + ".arrow_topk"]
S = sys.modules[__package__ + ".spectr_rerank"]
L = sys.modules[__package__ + ".lora_apply"]


def _cases():
    for dt in ("bf16", "fp16", "fp32"):
        # ROWS < BLOCK_T: decode tiles (1..8 real rows of the 16-row dot), incl. K_PAD 1 / 2 on 1-row tiles
        for bt, rows, bn, bd, kp, split, splits in [
                (16, 16, 64, 128, 32, True, 8), (64, 64, 64, 64, 32, False, 1), (64, 64, 128, 64, 128, True, 8),
                (16, 16, 64, 128, 1, False, 1), (16, 1, 64, 128, 32, True, 132), (16, 1, 64, 128, 1, True, 132),
                (16, 1, 64, 128, 2, False, 1), (16, 2, 64, 128, 32, True, 66), (16, 8, 128, 128, 128, True, 16)]:
            sig = {"x_ptr": "*" + dt, "p_ptr": "*" + dt, "idx_ptr": "*i32", "score_ptr": "*fp32", "part_ptr": "*i64",
                   "T": "i32", "N": "i32", "D": "i32", "K": "i32", "n_per_split": "i32", "stride_xt": "i32",
                   "stride_pn": "i32"}
            consts = {"SPLIT": split, "SPLITS": splits, "BLOCK_T": bt, "ROWS": rows, "BLOCK_N": bn, "BLOCK_D": bd,
                      "K_PAD": kp, "UPCAST": False}
            yield f"arrow_topk {dt} {consts}", A._arrow_topk_kernel, sig, consts, (8 if bt * (bn + 2 * kp) >= 8192 else 4)
        sig = {"x_ptr": "*" + dt, "a_ptr": "*" + dt, "cand_ptr": "*i32", "zp_ptr": "*fp32", "T": "i32", "N": "i32",
               "R": "i32", "D": "i32", "K": "i32", "d_per_split": "i32", "stride_xt": "i32", "stride_an": "i32",
               "stride_ar": "i32"}
        for rp in (1, 8, 128):
            yield (f"partial_z {dt} r{rp}", S._partial_z_kernel, sig,
                   {"R_PAD": rp, "BLOCK_K": 16, "BLOCK_D": 64 if rp <= 8 else 16}, 4)
        sig = {"x_ptr": "*" + dt, "a_ptr": "*" + dt, "sorted_ad_ptr": "*i32", "sorted_pair_ptr": "*i64",
               "z_ptr": "*fp32", "P": "i32", "N": "i32", "R": "i32", "D": "i32", "K": "i32", "stride_xt": "i32",
               "stride_an": "i32", "stride_ar": "i32"}
        for rp in (16, 128):
            yield (f"grouped_z {dt} r{rp}", S._grouped_z_kernel, sig,
                   {"R_PAD": rp, "BLOCK_P": 64, "BLOCK_D": 64, "UPCAST": False}, 4)
        sig = {"x_ptr": "*" + dt, "a_ptr": "*" + dt, "cand_ptr": "*i32", "cs_ptr": "*fp32", "zp_ptr": "*fp32",
               "sel_ptr": "*i32", "w_ptr": "*fp32", "z_ptr": "*fp32", "T": "i32", "N": "i32", "R": "i32", "D": "i32",
               "K": "i32", "M": "i32", "temperature": "fp32", "uniform_w": "fp32", "stride_xt": "i32",
               "stride_an": "i32", "stride_ar": "i32", "stride_cs": "i32"}
        for zm, hs, sm, mp, rp in [(0, False, False, 1, 8), (1, False, True, 4, 8), (0, True, True, 4, 1),
                                   (1, False, False, 1, 16), (1, False, True, 16, 128)]:
            consts = {"Z_MODE": zm, "Z_SPLITS": 3 if zm else 1, "HAS_SCORES": hs, "SOFTMAX": sm, "R_PAD": rp,
                      "M_PAD": mp, "BLOCK_K": max(16, mp), "BLOCK_D": 64 if rp <= 8 else 16}
            yield f"select {dt} {consts}", S._select_kernel, sig, consts, 4
        sig = {"y_ptr": "*" + dt, "b_ptr": "*" + dt, "sel_ptr": "*i32", "w_ptr": "*fp32", "z_ptr": "*fp32",
               "T": "i32", "N": "i32", "DOUT": "i32", "R": "i32", "M": "i32", "stride_yt": "i32",
               "stride_bn": "i32", "stride_bo": "i32"}
        # (BLOCK_T, BLOCK_R, BLOCK_O) as lora_apply._config picks them (BLOCK_O shrinks to 32 at small T)
        for bt, br, bo in [(1, 8, 32), (1, 16, 256), (2, 1, 256), (2, 16, 32), (4, 8, 128), (8, 8, 64),
                           (8, 16, 32), (8, 1, 256)]:
            yield (f"lora_apply {dt} T{bt} R{br} O{bo}", L._lora_apply_kernel, sig,
                   {"BLOCK_T": bt, "BLOCK_O": bo, "BLOCK_R": br}, 4)
    sig = {"part_ptr": "*i64", "idx_ptr": "*i32", "score_ptr": "*fp32", "T": "i32", "K": "i32"}
    for rows in (1, 2, 16):  # merge tiles of next_pow2(T) <= 16 rows
        for kp in (1, 2, 32, 128):
            splits = 132
            yield (f"topk merge rows{rows} k{kp}", A._merge_kernel, sig,
                   {"SPLITS": splits, "K_PAD": kp, "BLOCK_T": rows,
                    "BLOCK_C": A._merge_block_c(rows, splits * kp, kp)}, 4)


def main(capability: int = 90) -> int:
    target = GPUTarget("cuda", capability, 32)
    failures = 0
    for name, fn, sig, consts, warps in _cases():
        full_sig = dict(sig, **{k: "constexpr" for k in consts})
        try:
            triton.compile(ASTSource(fn=fn, signature=full_sig, constexprs=consts), target=target,
                           options=dict(num_warps=warps, num_stages=3))
        except Exception as exc:  # noqa: BLE001 - report every failing config
            failures += 1
            print(f"FAIL {name}: {exc!r}"[-2000:])
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
