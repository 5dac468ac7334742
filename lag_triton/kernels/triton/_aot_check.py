"""Compile every Triton kernel of this backend for an NVIDIA target without a GPU (CI guard).

    python -m lag_triton.kernels.triton._aot_check [--capability 90] [--jobs N] [--resources]

Runs the full Triton pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas cubin) for the
configurations the launchers pick, so a kernel that only works under TRITON_INTERPRET=1 fails
here. Must run with TRITON_INTERPRET unset (the interpreter swaps the top-k implementation).

Every configuration is compiled twice, as a launch specialises it: *aligned* (pointers and the
strides / widths that are multiples of 16 on real model shapes, e.g. d_in = 3072, carry Triton's
divisibility-16 attribute, which is what lets loads vectorise and the d-loops pipeline) and
*unaligned* (no attribute: the odd-size path, e.g. d_in = 2049), except where a launcher picks its
configuration by alignment (``Case.alignments``: the rerank's tiles, the filtering GEMM launched on
aligned operands only). ``--resources`` prints what
ptxas reports per configuration (registers per thread, spill bytes, shared memory): static
evidence about the compiled kernels that needs no GPU.

Every configuration that finishes a split reduction in its own launch (``last_to_arrive``) also has
its PTX checked for the memory-ordering protocol that makes that safe (``fold_ordering_error``):
the interpreter runs programs one after another, so no CPU test can see a missing barrier or fence.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .. import triton_interpreter_enabled
from . import arrow_topk as _unused  # noqa: F401  (ensure modules are imported)

A = sys.modules[__package__ + ".arrow_topk"]
AD = sys.modules[__package__ + ".arrow_decode"]
AF = sys.modules[__package__ + ".arrow_filter"]
HOPPER_SMS = 132  # launch configurations are enumerated as the launchers pick them on an H100 / H200
S = sys.modules[__package__ + ".spectr_rerank"]
G = sys.modules[__package__ + ".group_by_adapter"]
L = sys.modules[__package__ + ".lora_apply"]
T = sys.modules[__package__ + ".tuning"]


class Case(NamedTuple):
    """One launch configuration: kernel, argument types, constexprs, warps, and the specialisations it
    is launched with (True: aligned, False: unaligned; a plan that depends on alignment, as the
    rerank's does, yields one case per specialisation)."""

    name: str
    fn: object
    sig: dict
    consts: dict
    warps: int
    alignments: tuple[bool, ...] = (True, False)


# Integer arguments that are multiples of 16 on aligned shapes (pointers always are: torch allocations).
ALIGNED_INTS = {
    "D",
    "DOUT",
    "n_per_split",
    "stride_s",
    "stride_allowed",
    "d_per_split",
    "stride_xt",
    "stride_pn",
    "stride_an",
    "stride_ar",
    "stride_yt",
    "stride_bn",
    "stride_bo",
}


# (T, N, r, d_in, k, top_m, candidate_scores?) -> the plans spectr_rerank makes for them: every path
# (split-d decode, fused, adapter-grouped prefill, arrow-router scores), ranks 1 / 6 / 64 / 128, top_m 1 / 3 / 16.
RERANK_SHAPES = [
    (1, 1000, 6, 3072, 20, 1, False),
    (1, 1000, 6, 8192, 20, 3, False),
    (32, 10000, 6, 3072, 20, 1, False),
    (2048, 1000, 6, 3072, 20, 1, False),
    (2048, 100000, 6, 3072, 20, 1, False),
    (2048, 100000, 1, 8192, 20, 3, False),
    (5, 1000, 6, 3072, 20, 3, True),
    (1, 1000, 128, 3072, 20, 16, False),
    (1, 1000, 128, 3072, 20, 1, False),
    (32, 1000, 64, 3072, 20, 1, False),
    (1, 1000, 16, 3072, 20, 1, False),
    (256, 100000, 16, 3072, 20, 3, False),
    (256, 100000, 128, 3072, 20, 1, False),
    (2048, 1000, 128, 3072, 20, 1, False),
]


def _rerank_cases(dt: str):
    """Every kernel launch of spectr_rerank's plans for RERANK_SHAPES (configs from S.rerank_plan),
    aligned and unaligned: the plan gives unaligned operands smaller tiles."""
    for (t, n, r, d, k, m, scores), aligned in itertools.product(RERANK_SHAPES, (True, False)):
        yield from (
            Case(*case, alignments=(aligned,)) for case in _rerank_plan_cases(dt, t, n, r, d, k, m, scores, aligned)
        )


def _rerank_plan_cases(dt: str, t: int, n: int, r: int, d: int, k: int, m: int, scores: bool, aligned: bool):
    """The launches of one spectr_rerank plan (aligned or not)."""
    x_a = {"x_ptr": "*" + dt, "a_ptr": "*" + dt}
    strides = {"stride_xt": "i32", "stride_an": "i32", "stride_ar": "i32"}
    outputs = {"sel_ptr": "*i32", "w_ptr": "*fp32", "z_ptr": "*fp32"}  # and the sizes after them:
    sizes = {"T": "i32", "N": "i32", "R": "i32", "D": "i32", "K": "i32", "M": "i32", "temperature": "fp32"}
    plan = S.rerank_plan(t, n, r, d, k, m, scores, HOPPER_SMS, aligned)
    shape = f"T{t} N{n} r{r} d{d} k{k} m{m}"
    if plan.path == "split":
        sig = {
            **x_a,
            "cand_ptr": "*i32",
            "zp_ptr": "*fp32",
            **outputs,
            "ticket_ptr": "*i32",
            **sizes,
            "d_per_split": "i32",
            **strides,
        }
        for fold in (False, True):  # as the launcher passes them (fold_splits())
            yield (
                f"rerank partial_z {dt} {shape} fold={fold}",
                S._partial_z_kernel,
                sig,
                {
                    "R_PAD": plan.r_pad,
                    "BLOCK_K": plan.block_k,
                    "BLOCK_D": plan.block_d,
                    **plan.partial_fold_consts(fold, m > 1),
                },
                plan.gather_warps,
            )
    if plan.path == "grouped" and dt == "bf16":  # the counting sort reads adapter ids only: once
        group_sig = {"cand_ptr": "*i32", "count_ptr": "*i32", "P": "i32", "N": "i32"}
        yield f"rerank count_pairs {shape}", G._count_pairs_kernel, group_sig, {"BLOCK": G.GROUP_BLOCK}, 4
        group_sig = {
            "cand_ptr": "*i32",
            "cursor_ptr": "*i32",
            "grouped_ad_ptr": "*i32",
            "grouped_pair_ptr": "*i64",
            "P": "i32",
            "N": "i32",
        }
        yield f"rerank scatter_pairs {shape}", G._scatter_pairs_kernel, group_sig, {"BLOCK": G.GROUP_BLOCK}, 4
        sig = {
            **x_a,
            "sorted_ad_ptr": "*i32",
            "sorted_pair_ptr": "*i64",
            "z_ptr": "*fp32",
            "P": "i32",
            "N": "i32",
            "R": "i32",
            "D": "i32",
            "K": "i32",
            **strides,
        }
        yield (
            f"rerank grouped_z {dt} {shape}",
            S._grouped_z_kernel,
            sig,
            {
                "R_PAD": max(plan.r_pad, 16),
                "BLOCK_P": plan.block_p,
                "BLOCK_D": plan.grouped_block_d,
                "UPCAST": False,
            },
            4,
        )
    sig = {
        **x_a,
        "cand_ptr": "*i32",
        "cs_ptr": "*fp32",
        "zp_ptr": "*fp32",
        **outputs,
        **sizes,
        **strides,
        "stride_cs": "i32",
    }
    yield (
        f"rerank select {dt} {shape} {plan.path}",
        S._select_kernel,
        sig,
        {
            "Z_MODE": plan.z_mode,
            "Z_SPLITS": plan.z_splits,
            "HAS_SCORES": scores,
            "SOFTMAX": m > 1,
            "R_PAD": plan.r_pad,
            "M_PAD": plan.m_pad,
            "BLOCK_K": plan.block_k,
            "BLOCK_D": plan.block_d,
        },
        plan.select_warps,
    )


def _apply_sig(dt: str) -> dict:
    return {
        "y_ptr": "*" + dt,
        "b_ptr": "*" + dt,
        "sel_ptr": "*i32",
        "w_ptr": "*fp32",
        "z_ptr": "*fp32",
        "order_ptr": "*i64",
        "T": "i32",
        "N": "i32",
        "DOUT": "i32",
        "R": "i32",
        "M": "i32",
        "stride_yt": "i32",
        "stride_bn": "i32",
        "stride_bo": "i32",
        "stride_br": "i32",
    }


def _select_consts(cfg: dict, kp: int, scoped: bool, split: bool, fold: bool) -> dict:
    """Constants of the Arrow select as arrow_topk launches it (24 N-splits when split)."""
    splits = 24 if split else 1
    return dict(cfg, HAS_SCOPE=scoped, SPLIT=split, SPLITS=splits, K_PAD=kp, **A.select_fold_consts(fold, splits, kp))


def _jobs():
    """Every (configuration, specialisation) of ``_launch_cases`` once: the plans of different
    shapes often coincide (same kernel, signature, constants and warps), and one compile covers
    them all."""
    seen = set()
    for case in map(lambda c: Case(*c), _launch_cases()):
        for aligned in case.alignments:
            key = (case.fn.__name__, tuple(case.sig.items()), tuple(sorted(case.consts.items())), case.warps, aligned)
            if key not in seen:
                seen.add(key)
                yield case, aligned


def _launch_cases():
    for dt in ("bf16", "fp16", "fp32"):
        yield from _rerank_cases(dt)
        sig = _apply_sig(dt)
        # (T, d_out) -> configs as lora_apply.apply_config picks them on a 132-SM GPU; tokens sorted by
        # adapter from T = SORT_MIN_T on
        for t, d_out in [(1, 8192), (1, 3072), (2, 3072), (4, 8192), (32, 8192), (2048, 3072)]:
            cfg = L.apply_config(t, d_out, HOPPER_SMS)
            warps = cfg.pop("num_warps")
            yield (
                f"lora_apply {dt} T{t} d_out{d_out} {cfg}",
                L._lora_apply_kernel,
                sig,
                dict(cfg, SORTED=t >= L.SORT_MIN_T),
                warps,
            )
    # the Arrow select reads fp32 scores whatever the activation dtype; configs from the launcher's select_config
    sig = {
        "s_ptr": "*fp32",
        "buf_ptr": "*i64",
        "idx_ptr": "*i32",
        "score_ptr": "*fp32",
        "part_ptr": "*i64",
        "ticket_ptr": "*i32",
        "allowed_ptr": "*u8",
        "scope_ptr": "*i32",
        "N": "i32",
        "K": "i32",
        "S": "i32",
        "n_per_split": "i32",
        "stride_s": "i32",
        "stride_allowed": "i32",
    }
    for kp in (1, 2, 32, 128, A.MAX_K_PAD):
        for split, scoped, fold in (
            (False, False, False),
            (True, False, False),
            (True, False, True),
            (False, True, False),
            (True, True, False),
            (True, True, True),
        ):
            if fold and kp == A.MAX_K_PAD:  # the fold's merge is merge_partials at any K_PAD: the k128 cases cover it
                continue
            cfg = A.select_config(kp)
            warps = cfg.pop("num_warps")
            yield (
                f"arrow select k{kp} split={split} scoped={scoped} fold={fold}",
                A._select_kernel,
                sig,
                _select_consts(cfg, kp, scoped, split, fold),
                warps,
            )
    # every configuration a shipped per-GPU table (tuning.py, tuned/*.json) can choose
    for op, tuned_cfg, entry in T.all_table_configs():
        kp = entry.get("k_pad", 32)
        cfg = A.select_config(kp) if op == "arrow_select" else L.apply_config(1 << 20, 8192, HOPPER_SMS)
        cfg.update(tuned_cfg)
        warps = cfg.pop("num_warps")
        if op == "arrow_select":
            for split in (False, True):
                yield (
                    f"tuned arrow select {entry}",
                    A._select_kernel,
                    sig,
                    _select_consts(cfg, kp, scoped=False, split=split, fold=False),
                    warps,
                )
        else:
            for dt in ("bf16", "fp16", "fp32"):
                yield (
                    f"tuned lora_apply {dt} {entry}",
                    L._lora_apply_kernel,
                    _apply_sig(dt),
                    dict(cfg, SORTED=True),
                    warps,
                )
    # the one-launch Arrow for a few tokens (arrow_decode), as decode_plan sizes it on a 132-SM GPU
    for dt in ("bf16", "fp32"):  # fp16 takes bf16's code path (tl.dot of 16-bit tiles)
        sig = {
            "x_ptr": "*" + dt,
            "p_ptr": "*" + dt,
            "zp_ptr": "*fp32",
            "part_ptr": "*i64",
            "ticket_ptr": "*i32",
            "idx_ptr": "*i32",
            "score_ptr": "*fp32",
            "allowed_ptr": "*u8",
            "scope_ptr": "*i32",
            "T": "i32",
            "N": "i32",
            "D": "i32",
            "K": "i32",
            "S": "i32",
            "d_per_split": "i32",
            "stride_xt": "i32",
            "stride_pn": "i32",
            "stride_allowed": "i32",
        }
        for t, n, d, kp, scoped in (
            (1, 1000, 3072, 32, False),
            (1, 1000, 8192, 1, False),
            (1, 10000, 3072, 32, True),
            (1, 16384, 3072, 128, False),
            (32, 1000, 3072, 32, False),
            (32, 8192, 8192, 32, True),
        ):
            plan = AD.decode_plan(t, n, d, kp, HOPPER_SMS)
            yield (
                f"arrow decode {dt} T{plan['T_PAD']} N{n} d{d} k{kp} scoped={scoped} splits{plan['D_SPLITS']}",
                AD._decode_kernel,
                sig,
                dict(
                    {key: plan[key] for key in AD.PLAN_CONSTEXPRS},
                    HAS_SCOPE=scoped,
                    UPCAST=False,
                    RANK_ROWS=AD.RANK_ROWS,
                    K_PAD=kp,
                ),
                AD.DECODE_WARPS,
            )
    yield from _filter_cases()
    # the split-N merge, as arrow_topk launches it for decode-sized T (split_plan, then merge_rows)
    sig = {"part_ptr": "*i64", "idx_ptr": "*i32", "score_ptr": "*fp32", "T": "i32", "K": "i32"}
    shapes = ((1, 100_000), (1, 1_000_000), (2, 100_000), (16, 100_000), (32, 1_000_000))
    cases = [(t, n, kp) for t, n in shapes for kp in (1, 2, 32, 128)]
    for t, n, kp in cases + [(16, 100_000, 512), (16, 100_000, A.MAX_K_PAD)]:  # large k: fewer rows per tile
        splits, _ = A.split_plan(t, n, A.select_config(kp)["BLOCK"], HOPPER_SMS)
        rows = A.merge_rows(t, kp)
        yield (
            f"topk merge T{t} N{n} k{kp} splits{splits}",
            A._merge_kernel,
            sig,
            {"SPLITS": splits, "K_PAD": kp, "BLOCK_T": rows, "BLOCK_C": A.merge_block_c(rows, splits * kp, kp)},
            4,
        )


def _filter_cases():
    """The filtering GEMM path (arrow_filter), as filter_plan sizes it (GPU_CONFIG; compiled with 3
    pipeline stages, as GPU_CONFIG launches it). The GEMM is launched for 16-bit aligned operands
    only (``operands_fit``); the finish kernel for any."""
    assert AF.GPU_CONFIG["num_stages"] == 3
    common = {"T": "i32", "N": "i32", "D": "i32", "K": "i32", "S": "i32", "STRIDE": "i32"}
    strides = {"stride_xt": "i32", "stride_pn": "i32", "stride_allowed": "i32"}
    for dt in ("bf16", "fp16", "fp32"):
        x_p = {"x_ptr": "*" + dt, "p_ptr": "*" + dt}
        seed = {"seed_idx_ptr": "*i32", "seed_score_ptr": "*fp32"}
        scope = {"allowed_ptr": "*u8", "scope_ptr": "*i32"}
        gemm_sig = {**x_p, **seed, "buf_ptr": "*i64", "count_ptr": "*i32", **scope, **common, "SEED": "i32", **strides}
        finish_sig = {**x_p, **seed, "buf_ptr": "*i64", "count_ptr": "*i32", "idx_ptr": "*i32", "score_ptr": "*fp32"}
        finish_sig.update(scope, **{k: v for k, v in common.items() if k != "T"}, **strides)
        for scoped in (False, True):
            for t, n, k in ((2048, 100_000, 20), (64, 16_384, 1), (2048, 1_000_000, 65)):
                plan = AF.filter_plan(t, n, k)
                cfg = {key: plan[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "CAP")}
                if k == 20 and dt != "fp32":  # the GEMM's code does not depend on k; its CAP only moves pointers
                    yield Case(
                        f"arrow filter gemm {dt} scoped={scoped} {cfg}",
                        AF._filter_gemm_kernel,
                        gemm_sig,
                        dict(cfg, HAS_SCOPE=scoped, UPCAST=False, FLAT_SLOTS=AF.FLAT_SLOTS),
                        plan["num_warps"],
                        alignments=(True,),
                    )
                consts = dict(K_PAD=AF.finish_k_pad(k), CAP=plan["CAP"], RESCORE_N=plan["RESCORE_N"])
                yield (
                    f"arrow filter finish {dt} scoped={scoped} {consts}",
                    AF._finish_kernel,
                    finish_sig,
                    dict(consts, HAS_SCOPE=scoped, RESCORE_D=plan["RESCORE_D"]),
                    AF.FINISH_WARPS,
                )


_MEMORY_OPS = re.compile(r"\b(bar\.sync|barrier\.sync|atom\.|red\.|ld\.global|st\.global|cp\.async)")
# global loads: ld.global, and cp.async's pipelined copies to shared memory (.ca through L1, .cg and
# .bulk around it; not its commit/wait bookkeeping)
_LOAD = re.compile(r"ld\.global|cp\.async\.(ca|cg|bulk)\b")


def fold_ordering_error(ptx: str, folds: bool) -> str | None:
    """Why this PTX does not follow the last-to-arrive protocol (docs/design.md §3.1), or None.

    Per ``atom ... acq_rel`` (a ticket): the memory operation just before it is a CTA barrier (every
    thread's partial stores precede the release), and a barrier follows it before the next global
    load (every thread's partial loads come after the acquire); every global load after the first
    ticket is ``.cg`` (L1 is not coherent across SMs: a partial must not come from a stale line).
    Conservative: inputs read after the ticket (candidates, scope rows, masks) must be ``.cg`` too,
    since PTX does not say which loads read partials; bypassing L1 costs those few loads nothing.
    ``folds``: the configuration folds, so it must hold a ticket at all (a relaxed atomic would
    compile and pass every interpreter test).
    """
    ops = [line.strip() for line in ptx.splitlines() if _MEMORY_OPS.search(line)]
    tickets = [i for i, op in enumerate(ops) if "atom." in op and ".acq_rel" in op]
    if folds and not tickets:
        return "folds a split reduction but has no acq_rel atomic (the ticket)"
    for i in tickets:
        if ".gpu" not in ops[i]:
            return f"the ticket atomic is not gpu-scoped: {ops[i]}"
        if i == 0 or not ops[i - 1].startswith(("bar.sync", "barrier.sync")):
            return f"no CTA barrier right before the ticket atomic (before it: {ops[i - 1] if i else 'nothing'})"
        rest = ops[i + 1 :]
        first_load = next((j for j, op in enumerate(rest) if _LOAD.search(op)), len(rest))
        if not any(op.startswith(("bar.sync", "barrier.sync")) for op in rest[:first_load]):
            return "a global load follows the ticket atomic before any CTA barrier"
    after = ops[tickets[0] + 1 :] if tickets else []
    cached = [op for op in after if _LOAD.search(op) and ".cg" not in op and ".bulk" not in op]
    if cached:
        return f"a global load after the ticket atomic may hit a stale L1 line (not .cg): {cached[0]}"
    return None


def _ptxas_resources(ptx: str, capability: int) -> dict:
    """Registers, spill bytes and stack of the kernel in `ptx`, as ``ptxas -v`` reports them."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
        try:
            ptxas = get_ptxas(capability)
        except TypeError:  # Triton 3.4 / 3.5: one ptxas for every target
            ptxas = get_ptxas()
        log = subprocess.run(
            [ptxas.path, "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True,
            text=True,
        ).stderr
    num = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else -1  # noqa: E731
    return dict(
        regs=num(r"Used (\d+) registers"),
        spill_stores=num(r"(\d+) bytes spill stores"),
        spill_loads=num(r"(\d+) bytes spill loads"),
    )


#: the most shared memory one block may use (opted in), by compute capability: a kernel over it
#: compiles but fails at its first launch (Triton's OutOfResources)
SHARED_MEMORY_LIMIT = {80: 166_912, 86: 101_376, 87: 166_912, 89: 101_376, 90: 232_448}


def _compile(job):
    """Compile job `index` of _jobs(); returns (name, error or None, resources or None)."""
    index, capability, resources = job
    (name, fn, sig, consts, warps, _), aligned = list(_jobs())[index]
    name = f"{name} {'aligned' if aligned else 'unaligned'}"
    full_sig = dict(sig, **{k: "constexpr" for k in consts})
    attrs = {}
    if aligned:
        attrs = {
            (fn.arg_names.index(a),): [["tt.divisibility", 16]]
            for a, ty in sig.items()
            if ty.startswith("*") or a in ALIGNED_INTS
        }
    try:
        kernel = triton.compile(
            ASTSource(fn=fn, signature=full_sig, constexprs=consts, attrs=attrs),
            target=GPUTarget("cuda", capability, 32),
            options=dict(num_warps=warps, num_stages=3),
        )
    except Exception as exc:  # noqa: BLE001 - report every failing config
        return name, repr(exc)[-2000:], None
    ordering = fold_ordering_error(kernel.asm["ptx"], folds=bool(consts.get("FOLD")) or fn is AD._decode_kernel)
    if ordering is not None:
        return name, f"memory ordering: {ordering}", None
    limit = SHARED_MEMORY_LIMIT.get(capability, min(SHARED_MEMORY_LIMIT.values()))
    if kernel.metadata.shared > limit:
        return name, f"{kernel.metadata.shared} B of shared memory, over sm_{capability}'s {limit} B per block", None
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
    if triton_interpreter_enabled():
        print("unset TRITON_INTERPRET: the interpreter build of these kernels is not what a GPU compiles")
        return 2
    capability = args.capability_opt or args.capability
    jobs = [(i, capability, args.resources) for i in range(sum(1 for _ in _jobs()))]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(_compile, jobs))
    failures = 0
    for name, error, res in results:
        if error is not None:
            failures += 1
            print(f"FAIL {name}: {error}")
        elif res is not None:
            print(
                f"{res['regs']:4d} regs {res['spill_stores']:6d} B spill-st {res['spill_loads']:6d} B spill-ld "
                f"{res['smem']:6d} B smem {res['warps']} warps  {name}"
            )
    print(f"{len(results)} compiles for sm_{capability}, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
