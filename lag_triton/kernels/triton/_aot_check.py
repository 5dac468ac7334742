"""Compile every Triton kernel of this backend for an NVIDIA target without a GPU (CI guard).

    python -m lag_triton.kernels.triton._aot_check [--capability 90] [--jobs N] [--resources]

Runs the full Triton pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for the
configurations the launchers pick, so a kernel that only works under TRITON_INTERPRET=1 fails
here. Must run with TRITON_INTERPRET unset (the interpreter swaps the top-k implementation).

Every configuration is compiled twice, as a launch specialises it: *aligned* (pointers and the
strides / widths that are multiples of 16 on real model shapes, e.g. d_in = 3072, carry Triton's
divisibility-16 attribute, which is what lets loads vectorise and the d-loops pipeline) and
*unaligned* (no attribute: the odd-size path, e.g. d_in = 2049). ``--resources`` prints what
ptxas reports per configuration (registers per thread, spill bytes, shared memory): static
evidence about the compiled kernels that needs no GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import arrow_topk as _unused  # noqa: F401  (ensure modules are imported)

A = sys.modules[__package__ + ".arrow_topk"]
HOPPER_SMS = 132  # launch configurations are enumerated as the launchers pick them on an H100 / H200
S = sys.modules[__package__ + ".spectr_rerank"]
L = sys.modules[__package__ + ".lora_apply"]

# Integer arguments that are multiples of 16 on aligned shapes (pointers always are: torch allocations).
ALIGNED_INTS = {"D", "DOUT", "n_per_split", "stride_s", "stride_allowed", "d_per_split", "stride_xt", "stride_pn", "stride_an", "stride_ar",
                "stride_yt", "stride_bn", "stride_bo"}


def _cases():
    for dt in ("bf16", "fp16", "fp32"):
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
               "K": "i32", "M": "i32", "temperature": "fp32", "stride_xt": "i32",
               "stride_an": "i32", "stride_ar": "i32", "stride_cs": "i32"}
        for zm, hs, sm, mp, rp in [(0, False, False, 1, 8), (1, False, True, 4, 8), (0, True, True, 4, 1),
                                   (1, False, False, 1, 16), (1, False, True, 16, 128)]:
            consts = {"Z_MODE": zm, "Z_SPLITS": 3 if zm else 1, "HAS_SCORES": hs, "SOFTMAX": sm, "R_PAD": rp,
                      "M_PAD": mp, "BLOCK_K": max(16, mp), "BLOCK_D": 64 if rp <= 8 else 16}
            yield f"select {dt} {consts}", S._select_kernel, sig, consts, 4
        sig = {"y_ptr": "*" + dt, "b_ptr": "*" + dt, "sel_ptr": "*i32", "w_ptr": "*fp32", "z_ptr": "*fp32",
               "order_ptr": "*i64", "T": "i32", "N": "i32", "DOUT": "i32", "R": "i32", "M": "i32",
               "stride_yt": "i32", "stride_bn": "i32", "stride_bo": "i32", "stride_br": "i32"}
        # (T, d_out) -> configs as lora_apply.apply_config picks them on a 132-SM GPU; tokens sorted by
        # adapter from T = SORT_MIN_T on
        for t, d_out in [(1, 8192), (1, 3072), (2, 3072), (4, 8192), (32, 8192), (2048, 3072)]:
            cfg = L.apply_config(t, d_out, HOPPER_SMS)
            warps = cfg.pop("num_warps")
            yield (f"lora_apply {dt} T{t} d_out{d_out} {cfg}", L._lora_apply_kernel, sig,
                   dict(cfg, SORTED=t >= L.SORT_MIN_T), warps)
    # the Arrow select reads fp32 scores whatever the activation dtype; configs from the launcher's select_config
    sig = {"s_ptr": "*fp32", "buf_ptr": "*i64", "idx_ptr": "*i32", "score_ptr": "*fp32", "part_ptr": "*i64",
           "allowed_ptr": "*u8", "scope_ptr": "*i32", "N": "i32", "K": "i32", "S": "i32", "n_per_split": "i32",
           "stride_s": "i32", "stride_allowed": "i32"}
    for kp in (1, 2, 32, 128, A.MAX_K_PAD):
        for split, scoped in ((False, False), (True, False), (False, True), (True, True)):
            cfg = A.select_config(kp)
            warps = cfg.pop("num_warps")
            yield (f"arrow select k{kp} split={split} scoped={scoped}", A._select_kernel, sig,
                   dict(cfg, HAS_SCOPE=scoped, SPLIT=split, SPLITS=24 if split else 1, K_PAD=kp), warps)
    sig = {"part_ptr": "*i64", "idx_ptr": "*i32", "score_ptr": "*fp32", "T": "i32", "K": "i32"}
    for rows in (1, 2, 16):  # merge tiles of next_pow2(T) <= 16 rows
        for kp in (1, 2, 32, 128):
            splits = 132
            yield (f"topk merge rows{rows} k{kp}", A._merge_kernel, sig,
                   {"SPLITS": splits, "K_PAD": kp, "BLOCK_T": rows,
                    "BLOCK_C": A._merge_block_c(rows, splits * kp, kp)}, 4)


def _ptxas_resources(ptx: str, capability: int) -> dict:
    """Registers, spill bytes and stack of the kernel in `ptx`, as ``ptxas -v`` reports them."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
        log = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={arch}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True).stderr
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else -1  # noqa: E731
    return dict(regs=num(r"Used (\d+) registers"), spill_stores=num(r"(\d+) bytes spill stores"),
                spill_loads=num(r"(\d+) bytes spill loads"))


def _compile(job):
    """Compile case `index` of _cases() (aligned or not); returns (name, error or None, resources or None)."""
    index, aligned, capability, resources = job
    name, fn, sig, consts, warps = list(_cases())[index]
    name = f"{name} {'aligned' if aligned else 'unaligned'}"
    full_sig = dict(sig, **{k: "constexpr" for k in consts})
    attrs = {}
    if aligned:
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
                 for a, ty in sig.items() if ty.startswith("*") or a in ALIGNED_INTS}
    try:
        kernel = triton.compile(ASTSource(fn=fn, signature=full_sig, constexprs=consts, attrs=attrs),
                                target=GPUTarget("cuda", capability, 32), options=dict(num_warps=warps, num_stages=3))
    except Exception as exc:  # noqa: BLE001 - report every failing config
        return name, repr(exc)[-2000:], None
    res = None
    if resources:
        res = _ptxas_resources(kernel.asm["ptx"], capability)
        res["smem"] = kernel.metadata.shared
        res["warps"] = warps
    return name, None, res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("capability", nargs="?", type=int, default=90, help="compute capability (90 = H100)")
    ap.add_argument("--capability", dest="capability_opt", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiler processes")
    ap.add_argument("--resources", action="store_true", help="print ptxas registers / spills / shared memory")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter build of these kernels is not what a GPU compiles")
        return 2
    capability = args.capability_opt or args.capability
    jobs = [(i, aligned, capability, args.resources) for i in range(len(list(_cases()))) for aligned in (True, False)]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(_compile, jobs))
    failures = 0
    for name, error, res in results:
        if error is not None:
            failures += 1
            print(f"FAIL {name}: {error}")
        elif res is not None:
            print(f"{res['regs']:4d} regs {res['spill_stores']:6d} B spill-st {res['spill_loads']:6d} B spill-ld "
                  f"{res['smem']:6d} B smem {res['warps']} warps  {name}")
    print(f"{len(results)} compiles for sm_{capability}, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
