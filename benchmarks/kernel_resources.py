"""Registers, spills and shared memory of the delta rule's Triton kernels, compiled for Hopper without a GPU.

Usage (any machine with triton installed; no GPU needed)::

    python benchmarks/kernel_resources.py --out benchmarks/results/delta_kernel_resources_sm90.md
    python benchmarks/kernel_resources.py --batch 2 --out delta_kernel_resources_sm90_b2.md  # as at 2 x 16384

Each kernel is compiled for sm_90 (H100, H200) at the launch settings and tile sizes that
``triton_delta`` would use for bf16 inputs at the given K = V and chunk size, and its cubin is
read with the ``cuobjdump`` that ships with Triton: registers per thread, the stack frame
(register spills) and the dynamic shared memory. A kernel at 255 registers with a stack of
kilobytes spills in its inner loops; that is what to look at before timing on a GPU. The
numbers are those of the Triton installed here, which may differ from a GPU image's.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from householder.backends import _triton_delta_bwd as bwd  # noqa: E402
from householder.backends import _triton_delta_fwd as fwd  # noqa: E402
from householder.backends import triton_delta as td  # noqa: E402

from benchmarks._provenance import tree_commit  # noqa: E402
from benchmarks.compare_delta import apply_settings  # noqa: E402

# pointer arguments that are float32 or int64 whatever the inputs' dtype (see the launchers; the
# chunk inverses xs too unless CONFIG["x_half"] keeps them in the inputs' precision)
_FP32 = {"g", "gcs", "dkp", "dgp", "dbeta", "dg", "s0", "sT", "ds0", "dsT"}
_INT64 = {"chunks", "seqs"}
_SCALARS = {"T_steps": "i64", "NT": "i64", "scale": "fp32"}


def _signature(fn, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in _SCALARS:
            sig[name] = _SCALARS[name]
        elif name in _FP32 or (name == "xs" and not td.CONFIG["x_half"]):
            sig[name] = "*fp32"
        elif name in _INT64:
            sig[name] = "*i64"
        else:
            sig[name] = "*bf16"
    return sig


def resources(fn, constexprs: dict, warps: int, stages: int, capability: int = 90) -> dict:
    """Compile ``fn`` for sm_<capability>: registers, stack bytes and dynamic shared memory bytes."""
    unknown = set(constexprs) - set(fn.arg_names)
    if unknown:
        raise TypeError(f"{fn.__name__} takes no argument(s) {sorted(unknown)}")
    src = ASTSource(fn, _signature(fn, constexprs), constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps, "num_stages": stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split(":", 1) for line in out.splitlines() if "REG:" in line for item in line.split() if ":" in item)
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "shared": int(kernel.metadata.shared)}


SMS = 132


def seq_launch(plan, name, launch):
    """(BV, (warps, stages)) of a sequential pass from the plan's (BV, stage cap)."""
    BV, cap = launch
    warps, stages = td.CONFIG[name]
    return BV, (warps, min(stages, cap or stages))


def kernels(K: int, chunk: int, batch: int = 16):
    """(name, variant, kernel, constexprs, (warps, stages)) of one forward+backward as the launchers set them
    for ``batch`` sequences of H = 16 heads on 132 SMs (H100, H200): 16 as compare_delta.py's 16 x 2048, 2 as
    its 2 x 16384 (fewer programs: other value columns and launch settings of the sequential passes)."""
    plan = td._Plan(batch, 4 * chunk, 16, K, K, 1, chunk, None, torch.bfloat16, torch.device("cpu"))
    common = plan.common()
    small = min(plan.BKP, plan.BVB) < 64  # the backward's 4-warp cap (see _triton_delta_bwd.backward)
    a_form = bool(td.CONFIG["a_form"])
    for gated in (False, True):
        variant = "gated" if gated else "plain"
        gmode = td.CONFIG["gates"] if gated else 0
        # the kernels of a call with a backward: the scores formed in the passes or read from prep
        BV, cap = plan.state_launch(gated, want_o=True, sms=SMS)
        blocks, heads = plan.seq_grid(BV)
        writer = td.scores_writer(0.0 if gated else None, backward=True, output_pass=True, value_blocks=blocks,
                                  programs=blocks * heads, sms=SMS)
        qk_in, scores_out = writer is None, writer == "pass"
        yield ("prep", variant, fwd.prep_kernel, dict(common, BK=plan.BK, BKP=plan.BKP, BV=plan.BVP, HAS_G=gated, SAVE_X=True,
               SAVE_G=gmode in (1, 2), SAVE_E=gmode == 3, FPREC=plan.FPREC, SPLITS=td.CONFIG["inverse_splits"],
               AFORM=a_form, QK_OUT=writer == "prep"), td.CONFIG[td.prep_setting(writer == "prep")])
        if writer == "scores_kernel":
            yield ("scores", variant, fwd.scores_kernel, dict(common, BKS=plan.BKP, HAS_G=gated), td.CONFIG["scores"])
        seq = dict(common, BK=plan.BK, HAS_G=gated, GMODE=gmode, GATE_V=bool(td.CONFIG["gate_values"]), AFORM=a_form,
                   PREFETCH=td.prefetch_gates(gmode, "reverse"), QK_IN=qk_in)
        BV, launch = seq_launch(plan, td.state_setting(gated, True, blocks * heads, SMS), (BV, cap))
        yield ("state", variant, fwd.state_kernel, dict(seq, BV=BV, HAS_S0=False, STORE_ST=True, WRITE_O=True, SAVE_H=False,
                                                      SAVE_R=False, PREFETCH=td.prefetch_gates(gmode, "output"),
                                                      QK_IN=qk_in or scores_out, SCORES_OUT=scores_out), launch)
        dgm = td.dg_mode(torch.zeros(()) if gated else None)
        residuals = a_form and td.residuals_wanted(dgm)
        BV, launch = seq_launch(plan, td.state_setting(gated, False, 0, SMS), plan.state_launch(gated, want_o=False, sms=SMS))
        yield ("state (rerun)", variant, fwd.state_kernel, dict(seq, BV=BV, HAS_S0=False, STORE_ST=False, WRITE_O=False,
                                                                SAVE_H=True, SAVE_R=residuals, SCORES_OUT=False,
                                                                PREFETCH=td.prefetch_gates(gmode, "rerun")), launch)
        BV, launch = seq_launch(plan, td.setting_name("bwd_state", gated), plan.reverse_launch(gated, sms=SMS))
        yield ("bwd_state", variant, bwd.bwd_state_kernel, dict(seq, BV=BV, HAS_DST=False), launch)
        per_chunk = dict(common, BKP=plan.BKP, BV=plan.BVB, HAS_G=gated, UNROLL=int(td.CONFIG["bwd_unroll"]), DGM=dgm)
        aqk = dict(per_chunk, AQK=bool(td.CONFIG["dg_from_aqk"]) and not qk_in)
        fused = dict(aqk, UNROLL=int(td.CONFIG["fused_unroll"]), HAS_R=residuals, DW_FROM_DV=bool(td.CONFIG["dw_from_dv"]),
                     DG_MMA=bool(td.CONFIG["dg_rows_mma"]))
        splits, KPS = plan.key_splits(td.CONFIG["bwd_dqk_split"])
        for name, fn, meta in (("bwd_dqk", bwd.bwd_dqk_kernel, dict(aqk, KSPLIT=splits, KPS=KPS)),
                               ("bwd_wy", bwd.bwd_wy_kernel, dict(per_chunk, KSPLIT=splits)),
                               ("bwd_fused", bwd.bwd_fused_kernel, fused)):
            warps, stages = td.CONFIG[td.setting_name(name, gated)]
            yield (name, variant, fn, meta, (min(warps, 4) if small else warps, stages))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="markdown file to write")
    ap.add_argument("--dim", type=int, default=128, help="K = V")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="sequences B (H = 16): the launchers pick per B x H")
    ap.add_argument("--only", default="", help="comma-separated kernel names (default: all)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override an entry of triton_delta.CONFIG, as compare_delta.py --set")
    args = ap.parse_args()
    apply_settings(args.set)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the kernels are compiled for a GPU here, not interpreted")
    only = {x for x in args.only.split(",") if x}
    commit = tree_commit()
    lines = [
        "# Delta-rule Triton kernels compiled for sm_90: registers, spills, shared memory",
        "",
        f"- triton {triton.__version__} (compiled here, not launched: no GPU needed); householder commit {commit}; "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- bf16 inputs, K = V = {args.dim}, chunk {args.chunk}, H = 16; launch settings of triton_delta.CONFIG: "
        + ", ".join(f"{k}={v}" for k, v in td.CONFIG.items()),
        "- value columns of the state pass (forward, with the output) and the reverse pass: CONFIG's BV and bwd_state_BV, "
        f"or under None what the launchers pick at B = {args.batch}, H = 16 on 132 SMs (_Plan.state_launch, reverse_launch)",
        "- stack: bytes of local memory per thread (register spills); shared: dynamic shared memory per program",
        "",
        "| kernel | variant | value cols | warps | stages | registers | stack B | shared KiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, variant, fn, meta, (warps, stages) in kernels(args.dim, args.chunk, args.batch):
        if only and name not in only:
            continue
        cols = meta.get("BV", "-")  # value columns per program (per step of the per-chunk kernels' loops)
        try:
            r = resources(fn, meta, warps, stages)
            row = f"| {name} | {variant} | {cols} | {warps} | {stages} | {r['registers']} | {r['stack']} | {r['shared'] / 1024:.1f} |"
        except Exception as exc:  # a kernel that does not compile is a result too
            row = f"| {name} | {variant} | {cols} | {warps} | {stages} | failed: {type(exc).__name__}: {str(exc)[:200]} | | |"
        lines.append(row)
        print(row, flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
