#!/usr/bin/env python3
"""One small run of every kernel of every GPU backend, for ``compute-sanitizer`` (memcheck; racecheck and
synccheck for the CUDA backend, whose shared memory is ours).

Shapes are deliberately not multiples of any block size (ragged d_in / d_out / N / T), and cover
decode (T=1), a few tokens, and a prefill-sized T, the split-N top-k path (large N, T=1), every
router mode ("lag", "arrow" with candidate scores, "spectr" with k=N), top_m > 1 and fp32/bf16,
and the Triton backend with its split reductions folded (``triton-fold``: one-launch Arrow) and
with the filtering GEMM (``triton-filter``: its own case, a library and batch large enough for it).
Results are compared with the torch reference computed on CPU (so the sanitizer does not have to
instrument cuBLAS); mismatches are printed, not fatal: memcheck is the point here.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 bench/sanitize_kernels.py [--backends triton,cuda]
    python3 bench/sanitize_kernels.py --device cpu      # the same code path on CPU (Triton interpreter)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.harness import backend_context, backend_ops, log  # noqa: E402
from bench.timing import short_error  # noqa: E402

# (d_in, d_out, N, T, k, top_m, router)
CASES = [
    (96, 80, 50, 1, 20, 1, "lag"),
    (96, 80, 50, 7, 20, 2, "lag"),
    (72, 136, 300, 130, 20, 1, "lag"),  # many tokens: both backends group the rerank's pairs by adapter
    (61, 40, 200, 20, 20, 1, "lag"),  # ragged d_in
    (136, 72, 3001, 1, 20, 1, "lag"),
    (96, 80, 50, 5, 3, 3, "arrow"),
    (64, 40, 37, 3, 37, 1, "spectr"),
]
SMALL_CASES = [CASES[0], CASES[1], CASES[4]]
#: triton-filter runs only these (the other cases take the default Triton paths): past the GPU
#: limits of arrow_filter.filter_plan (N >= 16,384, T >= 64, 16-bit, aligned), and a CPU-sized one
FILTER_CASES = [(128, 80, 20000, 70, 20, 1, "lag")]
SMALL_FILTER_CASES = [(64, 40, 300, 5, 20, 1, "lag")]


def run_case(ops, ref, case, dtype, device, gen) -> str:
    from lag_triton.routing import RoutingConfig, route

    d_in, d_out, n, t, k, m, router = case
    x = torch.randn(t, d_in, generator=gen).to(dtype)
    a = torch.randn(n, 6, d_in, generator=gen) * d_in**-0.5
    a = a.to(dtype)
    b = (torch.randn(n, d_out, 6, generator=gen) * 0.05).to(dtype)
    p = a[:, 0].contiguous()
    y = torch.randn(t, d_out, generator=gen).to(dtype)
    cfg = RoutingConfig(k=k, top_m=m, router=router, combine="softmax")
    # GPU run: the three ops, as route() composes them, then the apply.
    xd, ad, bd, pd, yd = (v.to(device, copy=True) for v in (x, a, b, p, y))
    sel, w, z = route(xd, ad, pd, cfg, ops)
    ops.lora_apply(yd, bd, sel, w, z)
    if router == "lag":  # the top-k op on its own as well (idx + scores)
        idx, scores = ops.arrow_topk(xd, pd, min(k, n))
        idx_ref, _ = ref.arrow_topk(x, p, min(k, n))
    if device.type == "cuda":
        torch.cuda.synchronize()
    # CPU reference
    sel_r, w_r, z_r = route(x, a, p, cfg, ref)
    y_r = y.clone()
    ref.lora_apply(y_r, b, sel_r, w_r, z_r)
    sel_match = float((sel.cpu() == sel_r).all(dim=1).float().mean())
    err = float((yd.cpu().float() - y_r.float()).abs().max())
    msg = f"sel match {sel_match:.2f}, max |y - y_ref| {err:.3g}"
    if router == "lag":
        msg += f", top-k idx match {float((idx.cpu() == idx_ref).float().mean()):.2f}"
    return msg


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--backends",
        default="triton,cuda,triton-fold,triton-filter",
        help="triton-fold: the folded split reductions; triton-filter: the filtering GEMM",
    )
    p.add_argument("--small", action="store_true", help="only three small cases")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma list out of bf16, fp16, fp32")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    from lag_triton.kernels import get_ops

    ref = get_ops("torch")
    failures = 0
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    dtypes = [names[d.strip()] for d in a.dtypes.split(",") if d.strip()]
    for backend in [b.strip() for b in a.backends.split(",") if b.strip()]:
        ops, why = backend_ops(backend, device)
        if why:
            log(f"sanitize {backend}: {why}")
            continue
        if backend == "triton-filter":
            cases = SMALL_FILTER_CASES if a.small else FILTER_CASES
        else:
            cases = SMALL_CASES if a.small else CASES
        for dtype in dtypes:
            for i, case in enumerate(cases):
                gen = torch.Generator().manual_seed(1000 + i)
                t0 = time.perf_counter()
                try:
                    with backend_context(backend):
                        msg = run_case(ops, ref, case, dtype, device, gen)
                    log(f"sanitize {backend} {str(dtype)[6:]:8s} {case}: ok ({msg}) {time.perf_counter() - t0:.1f}s")
                except Exception as exc:  # noqa: BLE001
                    failures += 1
                    log(f"sanitize {backend} {str(dtype)[6:]:8s} {case}: ERROR {short_error(exc, 400)}")
    log(f"sanitize: done, {failures} failing case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
