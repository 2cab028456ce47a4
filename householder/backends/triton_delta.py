"""The delta rule on fused Triton kernels: launchers and the autograd Function.

Kernels: ``_triton_delta_fwd`` (chunk factor + state pass with the output) and
``_triton_delta_bwd`` (reverse state pass + per-chunk gradients). Inputs in
bfloat16, float16 or float32, accumulation in float32, final states float32.
Chunk sizes 16, 32 or 64. On a machine without a GPU the kernels run on CPU
tensors under TRITON_INTERPRET=1 (tests), with float32 matrix products.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import weakref
from typing import NamedTuple, Optional

import torch
import triton.language as tl

from householder.backends import _triton_delta_bwd as _bwd
from householder.backends import _triton_delta_fwd as _fwd
from householder.backends._launch import cdiv, interpreting, next_power_of_2

MAX_K = 256
# Launch settings (num_warps, num_stages) per kernel on GPUs; the interpreter ignores them.
# Chosen by an H100 sweep (compare_delta.py --sweep): the per-chunk forward kernel was fastest
# at 4 warps (on an H200 later, 2 warps took the forward from 0.753 to 0.736 ms plain and from
# 0.919 to 0.868 gated at 16 x 2048; 8 warps to 1.17 plain), the per-chunk backward kernels at 8
# (swept before bwd_wy moved to the inputs' precision), 64 value columns per backward step
# (bwd_BV). bwd_dqk at 2 stages: 2% off the gated forward+backward on an H200 with its loops
# rolled (bwd_wy and the fused kernel were not faster).
# (Triton's autotuner over several settings ended in an illegal memory access on an H100 with
# Triton 3.6, so the settings are fixed.)
CONFIG = {
    # BV, bwd_state_BV: value columns per program of the state pass (forward, and its rerun in the
    # backward) and of the backward's reverse pass; None: chosen per call (_Plan.seq_block,
    # reverse_launch: the plain reverse pass that forms its own scores takes 32), 64
    # where that still gives the GPU enough programs (1.5 per SM for the state pass under a_form,
    # else 3/4), else 32. Without a_form the gated op keeps 32 in the forward pass that writes the
    # output and in the reverse pass (it timed slower with 64 there: the gates' exponentials cost
    # registers the wider state tile needs); under a_form it timed faster with 64 (H200, 16 x 2048:
    # forward 0.689 -> 0.552 ms). The interpreter takes all columns in one program under None.
    "BV": None,
    "bwd_state_BV": None,
    "bwd_BV": 64,  # (32: forward+backward 1.804 -> 2.122 ms plain, 2.478 -> 2.908 gated at 16 x 2048, 00af916)
    # The prep kernel where it writes the masked scores Aqk (the gated op with a backward, or its
    # forward at the long shapes), and where it does not (prep_no_scores: the plain op, whose passes
    # form them, and the gated forward that forms them in its pass). On an H200 (a69e79d), 1 warp
    # instead of 2 took the plain forward from 0.417 / 0.417 / 0.514 / 0.538 to 0.334 / 0.331 / 0.430
    # / 0.453 ms at the four benchmark shapes, the plain forward+backward from 1.803 / 1.796 / 1.900
    # / 2.032 to 1.733 / 1.726 / 1.823 / 1.961, and the gated forward at the short shapes from 0.493 /
    # 0.492 to 0.411 / 0.407; where prep writes Aqk, 1 warp was slower (gated forward 0.629 -> 0.708
    # at 4 x 8192, gated forward+backward 2.430 -> 2.545 at 16 x 2048), and 4 or 8 warps slower still
    # (4: 0.494 -> 0.604 ms gated forward at 16 x 2048; benchmarks/results/delta_h200_ab_prep_*_a69e79d.md).
    # Forming Q K^T after the chunk factor, in a second loop over the keys, so that its float32 tile
    # is never live beside K K^T's or the inverse's (31e9bbb; sm_90 spills at 1 warp 2792 -> 888 B
    # per thread, 632 with 32-column key blocks; at 2 warps 240 -> 96) was slower at every warp
    # count: gated forward+backward 2.434 -> 2.475 (2 warps), 2.503 / 2.477 (1 warp) ms at
    # 16 x 2048 (H200, delta_h200_ab_fused_warps_prep_scores_last_31e9bbb.md). Since
    # pass_writes_scores and scores_kernel, prep writes Aqk only with both of those off.
    "prep": (2, 1),
    "prep_no_scores": (1, 1),
    # Where Aqk is written before the passes (the gated pass reads it: at the long shapes, or at
    # every shape under gated_scores_in_pass False), a kernel of its own writes it (scores_kernel, at
    # the "scores" launch setting) and prep none, so that prep runs at 1 warp (prep_no_scores). On an
    # H200 (2f75423, delta_h200_ab_scores_kernel_2f75423.md), with gated_scores_in_pass "few-blocks"
    # (the pass reads Aqk at 4 x 8192 and 2 x 16384), the gated forward went from 0.602 / 0.730 ms to
    # 0.578 / 0.684 there and the forward+backward from 2.623 / 2.803 to 2.581 / 2.750; the short
    # shapes, where the pass forms the scores, unchanged (0.407 / 2.337 ms at 16 x 2048). 2 or 8
    # warps instead of 4: 0.597 / 0.600 ms at 4 x 8192.
    "scores_kernel": True,
    "scores": (4, 1),
    # The sequential passes, plain and gated (state_setting, setting_name): the forward's pass that
    # writes the output (state, state_gated; state_few, state_few_gated where its programs do not
    # outnumber the SMs) and the backward's run of it again (state_rerun, state_rerun_gated). On an
    # H200 (scores_in_passes), 3 stages instead of 2 in both plain passes took the forward+backward
    # from 1.885 / 2.018 / 2.047 / 2.267 to 1.878 / 1.874 / 2.004 / 2.094 ms at
    # 16 x 2048 / 8 x 4096 / 4 x 8192 / 2 x 16384, but the forward from 0.413 / 0.411 / 0.523 to
    # 0.427 / 0.422 / 0.557 ms at the first three, where 256 and more programs share the SMs; at
    # 2 x 16384 (128 programs of 32 value columns) from 0.742 to 0.556. The rerun alone at 3 stages:
    # 1.884 / 1.878 / 2.049 / 2.072 -> 1.862 / 1.861 / 1.969 / 2.092. The gated passes at 3 stages:
    # forward 0.546 / 0.543 / 0.664 / 0.885 -> 0.705 / 0.702 / 0.770 / 0.769 ms, forward+backward
    # 3.211 -> 3.085 at 2 x 16384 and no faster elsewhere. (At 1 stage and 32 value columns the
    # gated passes hit an illegal memory access on an H200 with Triton 3.6, at 4 x 8192.)
    "state": (4, 2),
    "state_few": (4, 3),
    "state_rerun": (4, 3),
    "state_gated": (4, 2),
    # the gated rerun alone at 3 stages (329d53b, H200): forward+backward 2.536 / 2.527 / 2.798 /
    # 2.871 -> 2.469 / 2.484 / 2.682 / 2.860 ms
    "state_rerun_gated": (4, 3),
    "state_few_gated": (4, 3),
    "bwd_state": (4, 2),
    "bwd_state_gated": (4, 2),
    "bwd_dqk": (8, 2),
    "bwd_wy": (8, 1),
    # the fused backward (plain): 2 pipeline stages took the plain forward+backward from 2.174 /
    # 2.174 / 2.202 / 2.407 to 2.034 / 2.035 / 2.060 / 2.273 ms on an H200 (43738ca, Triton 3.6)
    "bwd_fused": (4, 2),
    # the fused kernel with a gate: on an H200 (38199de, fused) 8 warps took the gated forward+backward
    # from 3.488 / 3.476 / 3.890 / 4.476 ms at 4 to 3.364 / 3.347 / 3.770 / 4.364 at (16, 2048),
    # (8, 4096), (4, 8192), (2, 16384); the plain op at 8 went from 2.488 to 2.770 at 16 x 2048.
    # Since the residuals and dV's reuse (516c767, d5f2e2d) 4 warps are the faster again (f8525b5:
    # 3.117 / 3.099 / 3.431 / 3.625 ms at 8 against 3.064 / 3.061 / 3.364 / 3.574 at 4). Two
    # pipeline stages (Triton 3.6; 41a9639): 2.858 / 2.857 / 3.126 / 3.326 -> 2.753 / 2.753 / 3.021 /
    # 3.225 ms (8 warps, 2 stages: 3.025 / 3.026 / 3.290 / 3.489); at 0fe442e's order of loads,
    # 3.067 / 3.068 / 3.336 / 3.537 -> 2.729 / 2.727 / 2.999 / 3.195 (43738ca's run). Triton 3.9
    # builds the same registers, spills and shared memory for sm_90 at 1 and 2 stages. At 2 warps
    # (2152 -> 2800 B spilled per thread) both fused kernels were ten times slower: forward+backward
    # 1.732 -> 18.09 ms plain, 2.436 -> 22.35 gated at 16 x 2048 (H200, 31e9bbb,
    # delta_h200_ab_fused_warps_prep_scores_last_31e9bbb.md).
    "bwd_fused_gated": (4, 2),
    "bwd_chunk": None,  # chunk size of the backward pass (None: the forward's)
    # How the sequential passes get the decays of a chunk: 0 sum the log-decays from g there (a
    # scan and a reduction across warps, then exponentials, in every chunk step), 1 load the running
    # log-decays G from the prep kernel's output (last row by a scalar load), 2 load them (last row
    # by a reduction), 3 load the decays e^G, e^{G_C - G} and e^{G_C} as prep wrote them (no scan,
    # reduction or exponential left in the step). 1 timed slower than 0 on the H100 (gated forward
    # 0.95 -> 1.27 ms, before a_form), and 1, 2 and 3 on an H200 (2bb074a, no prefetching: gated
    # forward+backward 3.153 / 3.328 / 3.401 / 3.252 ms at 16 x 2048, 3.488 / 3.536 / 3.598 / 3.543
    # at 4 x 8192): loads on the step's path cost more than the scan. All agree to float32 rounding.
    "gates": 0,
    # Under gates 0 and 3, the sequential passes load what a chunk's decays are made of (g, or the
    # decays) one chunk ahead, in the step before, so that the loads' latency is not on the step
    # that uses them (Triton's pipeliner stages the loads that feed tl.dot, not these). True: in
    # every pass; "output": in the forward's pass that writes the output only; "output+rerun",
    # "output+reverse": there and in the backward's rerun of it, or its reverse pass; False: in none
    # (PREFETCH_SETTINGS). On an
    # H200 (b7a0da7, gates 0), every pass: gated forward 0.976 -> 0.895 ms at 2 x 16384 but its
    # forward+backward 3.758 -> 4.267 (the backward's passes slower); the output's pass only (9ddfa62):
    # forward+backward 3.118 / 3.097 / 3.444 / 3.690 -> 3.100 / 3.093 / 3.416 / 3.610 at the four
    # shapes. Gates 3 with prefetching, every pass: 3.275 / 3.255 / 3.407 / 3.648 (b7a0da7).
    "prefetch_gates": "output",
    # Keep the forward's chunk quantities (A, or W and U; Aqk where prep writes it) and chunk
    # inverses X for the backward instead of recomputing them there: one per-chunk kernel less in
    # the backward, for BC * 2 bytes per step and head for each of A, X (x_half; else BC * 4) and
    # Aqk (bf16 inputs; W and U: (K + V) * 2): q's size at K = V = 128 and chunk 64 plain, 1.5x
    # gated. False: only the inputs are kept, as before.
    "save_prep": True,
    # With save_prep, also keep the per-chunk states and pseudo-values (and the residuals, under
    # keep_residuals) written by the forward's state pass, so that the backward skips that pass
    # too: (K * V / BC + 2 * V) * 2 more bytes per step and head (4x q's size at K = V = 128, chunk
    # 64). On the H100 it saved 6-9% of a forward+backward at the same peak; on an H200 with the
    # passes side by side (ef33ae3) from -1.6% to +6% (gated 4 x 8192: 3.640 -> 3.417 ms). It holds
    # 512 MiB more per call between the passes (at 32768 tokens, H = 16): off, because a model holds
    # that for every layer awaiting its backward.
    "save_states": False,
    # One per-chunk backward kernel (bwd_fused_kernel) instead of two (bwd_dqk, then bwd_wy): dW
    # and the second kernel's reloads of dVn, k and the partial dk no longer go through memory.
    # 0: never, 1: unless the gate's gradient takes the "decays" form (CONFIG["dg_form"]), 2: always.
    # On an H200 (rolled loops, 4 warps) the plain forward+backward takes 2.68 ms at 16 x 2048 and
    # 3.28 at 2 x 16384 against the two kernels' 3.08 and 3.62. With a gate, at 4 warps, the fused
    # kernel was level with the two, and at 8edc297 4% slower (3.595 against 3.453 ms at 16 x 2048);
    # once it summed S o dS' along the value columns as it formed it (38199de) rather than holding a
    # float32 tile of it, at 8 warps (bwd_fused_gated) it became the faster: 3.364 / 3.347 / 3.770 /
    # 4.364 ms against the two kernels' 3.491 / 3.477 / 3.897 / 4.507 at the four benchmark shapes
    # (the last two from 9748ec3's table), and it holds 125 MiB less. Its gradients matched the
    # float64 path on an H200 at chunk 64 and K = V = 64, 128, 256 (tests/test_delta_triton.py's
    # model-head test).
    "fuse_bwd": 2,
    # The gate's gradient through the scores' decays from the forward's masked scores Aqk (held
    # in the inputs' precision) rather than from Q K^T formed again in the backward: 1.5% off the
    # gated forward+backward on an H200. Off, the passes too form the scores where
    # gated_scores_in_pass says (prep writes no Aqk): on an H200 (00af916) the gated
    # forward+backward went from 2.481 / 2.490 / 2.700 / 2.874 to 2.829 / 2.851 / 2.948 / 3.118 ms
    # at the four benchmark shapes (64 MiB less peak at the first two).
    "dg_from_aqk": True,
    # Without a gate, the sequential passes (the forward's, its rerun has no output, and the reverse
    # pass) form the masked scores tril(Q K^T) from the query and key tiles they load anyway, one
    # (C, K) x (K, C) product per chunk off the state's dependency chain, and prep neither reads q
    # nor writes Aqk: per step and head, K + 2 C bytes less read and C written in the forward (bf16).
    # On an H200 (53285d6) the plain forward went from 0.592 to 0.413 ms at 8 x 4096 and the plain
    # forward+backward from 2.041 to 1.879 (2.070 -> 2.051 at 4 x 8192, 2.278 -> 2.262 at
    # 2 x 16384), 64 MiB less peak.
    "scores_in_passes": True,
    # The same for the gated op's forward pass, in a forward that no backward follows (the gate's
    # gradient reads Aqk in the per-chunk backward), with Gamma = exp(G_t - G_s) formed there too.
    # On an H200 (be1069e) the gated forward went from 0.548 / 0.547 to 0.531 / 0.527 ms at 16 x 2048
    # and 8 x 4096 but from 0.669 / 0.770 to 0.713 / 0.951 at 4 x 8192 and 2 x 16384, where fewer
    # programs leave the extra work on each one's chain. There the pass took 32 value columns, so
    # that each chunk's Q K^T was formed by 4 programs, against 2 at the short shapes:
    # "few-blocks" forms them in the pass only where at most 2 programs per head share a chunk: on an
    # H200 (fec0d2b) 0.547 / 0.547 / 0.667 / 0.771 -> 0.527 / 0.528 / 0.668 / 0.771 ms at the four
    # benchmark shapes (the last two at 32 columns, so as before). Since the pass takes the scores'
    # log-decays from the g it prefetched (a465726: 0.532 / 0.528 -> 0.505 / 0.502 ms at the two
    # short shapes), forming them at the long ones too (True) is still slower: 0.634 -> 0.675 ms at
    # 4 x 8192, 0.733 -> 0.876 at 2 x 16384 (0.651 and 1.085 at 64 value columns). Since prep runs at
    # 1 warp where it writes no Aqk (prep_no_scores), True took the gated forward at 4 x 8192 from
    # 0.629 / 0.630 to 0.605 / 0.606 ms, and at 2 x 16384 from 0.735 / 0.734 to 0.818 / 0.819 (H200,
    # ec82f8f, benchmarks/results/delta_h200_ab_scores_in_pass_ec82f8f.md): with 4 value blocks each,
    # the pass there runs 256 and 128 programs on 132 SMs. "auto" forms them in the pass where at most
    # 2 value blocks share a chunk, or where the pass's programs outnumber the SMs (so that another
    # program's work hides the extra products on each one's chain). Since scores_kernel writes Aqk
    # and prep runs at 1 warp beside it, reading it is the faster at 4 x 8192 too: "few-blocks"
    # (0.578 ms against "auto"'s 0.604 there, 2f75423; the same elsewhere).
    "gated_scores_in_pass": "few-blocks",
    # With a backward that reads Aqk (dg_from_aqk), the gated forward's output pass forms the
    # scores where gated_scores_in_pass would have it form them without a backward, and writes
    # them (the programs of its first value block) for the backward; prep then writes no Aqk and
    # runs as prep_no_scores. False: prep writes Aqk for every call with a backward. On an H200
    # (b04c801, two rounds in one process) the gated forward+backward went from 2.418 / 2.419 /
    # 2.629 ms to 2.336 / 2.345 / 2.617 at 16 x 2048, 8 x 4096 and 4 x 8192 (2.80 at 2 x 16384,
    # where the pass reads Aqk either way; delta_h200_ab_pass_writes_scores_b04c801.md).
    "pass_writes_scores": True,
    # Quadrant splits (0, 1, 2) of the chunk factor's triangular inverse in the prep kernel: 0
    # inverts the whole chunk by doubling, which at chunk 64 is 4.3x (1 split) or 15x (2) the
    # multiply-adds of the split forms. H200, forward at 16 x 2048: 0.984 / 1.022 / 0.948 ms.
    "inverse_splits": 2,
    # Unrolling of the per-chunk backward kernels' loops over key and value blocks (Triton's
    # loop_unroll_factor; 1: none). Unrolled in full (tl.static_range, as before), they spilled
    # 0.9-2.4 KB of registers per thread in sm_90 builds at K = V = 128 and 5.8 KB fused; rolled,
    # 24-256 B (benchmarks/kernel_resources.py). On an H200, rolled (1) took the gated forward+
    # backward (bwd_dqk + bwd_wy) from 4.25 to 4.06 ms at 16 x 2048 and from 4.93 to 4.75 at 2 x 16384.
    # The fused kernel (fused_unroll): rolled 2.68 ms at 16 x 2048, unrolled 2.97 (plain).
    "bwd_unroll": 1,
    "fused_unroll": 1,
    # bwd_dqk's programs per chunk and head, each over its own key columns (whole BKP-wide blocks,
    # so at most K / 64 of them): more programs of half the key loop each, for dM formed again
    # per split (C x C x V multiply-adds) and dO, Vn read again. On an H200, 2 splits took the
    # gated forward+backward from 3.86 to 4.14 ms at 16 x 2048 (4.64 to 4.92 at 2 x 16384) and the
    # plain one on two kernels from 3.08 to 2.96 (3.62 to 3.48), still behind the fused kernel.
    "bwd_dqk_split": 1,
    # The gated sequential passes scale the (C, BV) value-side tiles by the chunk's decays instead
    # of the (C, K) keys and queries (the same products: K^T diag(d) Vn = (diag(d) K)^T Vn): a
    # quarter of the exponentials' multiplies and no float32 copies of K and Q at K = 128, BV = 32.
    # Built for sm_90 (Triton 3.9) it spills no less (gated state / reverse pass at 32 columns: 80 / 280
    # B per thread against 48 / 264; at 64: 832 / 832 against 416 / 656). On an H200 it took the
    # gated forward from 0.918 to 1.143 ms at 16 x 2048 (from 1.178 to 1.141 at 2 x 16384): off.
    # The tests check that both agree.
    "gate_values": False,
    # The sequential passes take the chunk factor A and form Vn = A (V - diag(e^G) K S) rather than
    # Vn = U - W S from W = A diag(e^G) K and U = A V written by the prep kernel: per step and head,
    # a (C, C) tile of A is written and read instead of K + V columns of W and U (at K = V = 128 and
    # chunk 64, a quarter of the bytes), for one (C, C) x (C, BV) product more per chunk on each
    # sequential pass's critical path (and A^T dVn in the reverse pass).
    "a_form": True,
    # The form of the gate's gradient dg (the output and the other gradients are the same under
    # each). "decays": each chunk's own terms through its decays (scores, factor, keys, queries,
    # state). "chunk": with G_t the running sum of g from the chunk's start, the chunk is the plain
    # rule on q_t e^{G_t}, v_t e^{-G_t} and states S_t e^{-G_t}, so dL/dG_t = q_t . dq_t - v_t . dv_t,
    # plus sum(S_C o dS_C) of the chunk's end state at its last step, summed backward inside the
    # chunk; the per-chunk kernels then skip the decay terms of scores and factor. On an H200
    # (34d3b93, fused, 8 warps) "chunk" took the gated forward+backward from 3.364 to 3.211 ms at
    # 16 x 2048 and from 4.364 to 4.199 at 2 x 16384, but dg's bf16 error against float64 (max
    # error / max |dg|) rose from 2.8e-3 to 1.2e-2 (logsigmoid gates, T = 2048 and 16384): the
    # end state's term and the rows' v . dv largely cancel. A third form, the same rescaling
    # along the whole sequence summed by a scan kernel (cbe9c56 - 38199de), was 1-2% faster than
    # "chunk" and 5e-2 - 1.6e-1 off: removed.
    "dg_form": "decays",
    # Run the backward's reverse pass on a second stream beside the forward's pass run again (it
    # reads none of that pass's states): where few (N x H) programs leave SMs idle, the two
    # latency-bound passes share the GPU rather than run one after the other: on an H200 at 2 x 16384
    # the plain forward+backward went from 3.039 to 2.678 ms and the gated one from 4.335 to 3.912,
    # level at 16 x 2048. No effect with save_states (no pass to run again) or under the interpreter.
    "overlap_passes": True,
    # Under a_form and the fused backward, the pass that writes the per-chunk states also writes the
    # residuals R = V - diag(e^G) K S of each chunk (the operand of Vn = A R, in the inputs'
    # precision), and the fused kernel takes dA's state term from them, dA = dVn R^T, instead of
    # forming K S again per value block: C x K x V multiply-adds and a read of S fewer per chunk, and
    # one (C, BV) float32 accumulator fewer live in its first loop, for V columns more written by
    # that pass and held until the fused kernel has run. On an H200 (516c767) 3.6-5.6% off every
    # forward+backward (gated 3.360 -> 3.173 ms at 16 x 2048, plain 2.521 -> 2.426), for 128 MiB
    # more peak at 32768 tokens, H = 16 (1507 -> 1635 MiB; fla's 1857).
    "keep_residuals": True,
    # The fused kernel takes dk's term A^T dW as -dV S^T, from the dV = A^T dVn it wrote in its first
    # loop (dW = -dVn S^T), rather than forming dW per key block and multiplying by A^T: one (C, C) x
    # (C, 64) product per key block fewer, for dV read back in the inputs' precision (dW was
    # rounded to it too). On an H200 (d5f2e2d) 3-4% off every forward+backward (plain 2.342 ->
    # 2.244 ms, gated 3.249 -> 3.136 at 16 x 2048); errors against float64 unchanged.
    "dw_from_dv": True,
    # The gated fused kernel's key loop takes K and Q for its dg row sums as products with the
    # identity (exact), so that the sums stay in the matrix units' layout rather than being converted
    # to the loaded tiles' layout through shared memory, three (C, 64) float32 tiles per key block (in
    # the sm_90 TTGIR that Triton 3.9 builds, the conversions go; two (C, C) x (C, 64) products per key
    # block come, and 112 B more spills per thread). Cutting the key loop's dg sums out took the kernel
    # from 1.760 to 1.389 ms at 16 x 2048 (H200, 4 warps); this took 0.3-0.5% off the gated
    # forward+backward at every shape (H200, 0fe442e: 3.129 / 3.113 / 3.384 / 3.577 -> 3.112 /
    # 3.103 / 3.375 / 3.565 ms), with the same errors against float64 to two digits.
    # (Taking two of the three sums in the value loop instead, through dW as rowsum(dV o (R - V))
    # and through the end state's keys as rowsum(Vn o dVn) - colsum(dM o M), lowered the sm_90
    # build's spills from 2152 to 1904 B per thread but took the gated forward+backward from
    # 2.409 / 2.409 / 2.632 / 2.807 to 2.673 / 2.678 / 2.899 / 3.071 ms on an H200, and dg's
    # error against float64 from 1.8e-3 to 7.4e-3: dVn in bf16 carries its scale M^T dO term,
    # which the second form subtracts again (e23f043, benchmarks/results/delta_h200_ab_e23f043.md).)
    "dg_rows_mma": True,
    # The chunk inverses X that the forward keeps for the backward (save_prep), in the inputs'
    # precision (True) rather than float32: half the bytes of the largest per-chunk tile written in
    # the forward and read in the backward (64 MiB each way at 32768 tokens, H = 16, chunk 64). The
    # backward already takes the factor A = X diag(beta) rounded to the inputs' precision in its
    # products; X's own terms (dL = -X^T dX X^T, beta's) round the same way. On an H200 (fec0d2b)
    # the plain forward+backward went from 1.917 / 1.923 / 2.021 / 2.054 to 1.874 / 1.881 / 1.991 /
    # 2.022 ms at the four benchmark shapes, the gated one from 2.730 / 2.738 / 2.999 / 3.075 to
    # 2.504 / 2.511 / 2.785 / 2.860 (its fused kernel no longer holds float32 X tiles), 64 MiB less
    # peak; errors against float64 the same to two digits (dg 2.2e-3, the rest 4.1e-3 - 6.0e-3).
    "x_half": True,
}
CHUNK_SIZES = (16, 32, 64)
# Programs per SM a sequential pass needs before it takes 64 value columns (_Plan.seq_block): the
# general rule, and the one of the passes whose chunk step also multiplies by the factor A (a_form)
_FILL, _FILL_A_FORM = 0.75, 1.5
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def check_available(x) -> None:
    """Refuse tensors the kernels cannot run on here, with the reason."""
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"backend 'triton' needs CUDA tensors; got q on {x.device} (set TRITON_INTERPRET=1 before "
            f"importing householder to run the kernels on the CPU, or pass backend='torch')"
        )


# -- launch plans -----------------------------------------------------------------------


class _Plan:
    """Sequences, chunks and meta-parameters of one call."""

    def __init__(self, B, T, H, K, V, NH, BC, offsets, dtype, device, cu_seqlens=None):
        self.args = (B, T, H, K, V, NH, BC, offsets, dtype, device, cu_seqlens)
        self.B, self.T, self.H, self.K, self.V, self.NH, self.BC = B, T, H, K, V, NH, BC
        self.T_steps = T * NH
        self.varlen = offsets is not None or cu_seqlens is not None
        if offsets is not None:
            self.N = len(offsets) - 1
            self.seqs, self.chunks, self.NT_total = _varlen_tables(tuple(offsets), NH, BC, str(device))
            self.NT = 0
        elif cu_seqlens is not None:
            # offsets left on the device: tables made there, for as many chunks as any N sequences of
            # T tokens can have; the programs of chunks beyond the real ones find no rows and store
            # nothing (the backward's read per-chunk states no pass wrote, and drop what they make)
            self.N = cu_seqlens.shape[0] - 1
            self.NT_total = cdiv(self.T_steps, BC) + self.N
            self.seqs, self.chunks = _device_tables_of(cu_seqlens, NH, BC, self.NT_total, device)
            self.NT = 0
        else:
            self.N = B
            self.NT = cdiv(self.T_steps, BC)
            self.NT_total = B * self.NT
            self.seqs = self.chunks = torch.empty(2, dtype=torch.int64, device=device)
        self.dtype = dtype
        interp = interpreting()
        self.F32 = interp or dtype == torch.float32
        self.DT = tl.float32 if self.F32 else _TL[dtype]
        # tl.dot precision of float32 operands (the interpreter is exact whatever it is told). The
        # chunk factor is float32 for every input dtype: tf32x3 keeps float32 inputs near float32
        # accuracy, tf32 is enough for half inputs, whose outputs round to 8 (bf16) bits anyway.
        self.PREC = "ieee" if interp else "tf32x3"
        self.FPREC = "ieee" if interp else ("tf32x3" if dtype == torch.float32 else "tf32")
        self.BK = max(16, next_power_of_2(K))
        # Loads of the sequential passes are double-buffered unless their tiles outgrow shared memory
        # (227 KB on an H100 or H200): float32 at K >= 128 (238 KB in the reverse pass), and the
        # forward pass that writes the output in half precision at K = 256 (232 KB). Only there:
        # bfloat16 K = 256 single-staged in the rerun without the output (32 value columns) hit an
        # illegal memory access on an H200 with Triton 3.6, and ran right double-buffered.
        self.seq_stages = 1 if (dtype == torch.float32 and self.BK >= 128) else None
        self.out_stages = 1 if dtype.itemsize * self.BK >= 512 else None
        self.BKP = min(64, self.BK)
        self.BVP = min(64, max(16, next_power_of_2(V)))
        self.BVB = min(CONFIG["bwd_BV"], max(16, next_power_of_2(V)))
        self.device = device

    def state_launch(self, gated: bool, want_o: bool, sms: Optional[int] = None) -> tuple:
        """(value columns, stage cap) of the state pass; ``sms`` stands in for the device's SM count."""
        # under a_form the forward's pass wants more programs before it takes 64 columns: on an H200
        # at 4 x 8192 (128 programs of 64 columns) 32 took the plain forward from 0.588 to 0.557 ms
        # and the gated one from 0.704 to 0.682
        fill = _FILL_A_FORM if CONFIG["a_form"] else _FILL
        BV = self.seq_block(CONFIG["BV"], wide=not gated or not want_o or bool(CONFIG["a_form"]), sms=sms, fill=fill)
        if want_o and CONFIG["a_form"] and self.dtype.itemsize == 2 and self.BK >= 256:
            # half precision at K = 256, single-staged: as in the reverse pass, 64 value columns (the
            # gated pass at 32 hit an illegal memory access on an H200 with Triton 3.6; 64 ran right)
            BV = max(BV, self.seq_block(64, wide=True))
        return BV, self.out_stages if want_o else self.seq_stages

    def reverse_launch(self, gated: bool, sms: Optional[int] = None, beside: bool = False) -> tuple:
        """(value columns, stage cap) of the backward's reverse pass; ``beside``: it runs beside the
        forward's pass run again (CONFIG["overlap_passes"])."""
        # beside the other pass, the gated one wants as many programs as the forward's pass before
        # it takes 64 columns: on an H200 at 4 x 8192 (128 programs of 64 columns) 32 took the gated
        # forward+backward from 3.889 to 3.650 ms (3.743 with the passes one after the other); the
        # plain one there went from 2.492 to 2.673 with 32 and keeps the rule of 3/4 of the SMs
        fill = _FILL_A_FORM if beside and gated and CONFIG["a_form"] else _FILL
        # the plain pass that forms its own scores holds their (C, C) tile beside the state (its
        # sm_90 build spilled 680 B per thread at 64 columns, against 544 reading them): at 32 the
        # plain forward+backward went from 1.925 / 1.922 / 2.031 to 1.835 / 1.832 / 1.932 ms at
        # 16 x 2048 / 8 x 4096 / 4 x 8192 (H200, fec0d2b; 2 x 16384 took 32 already)
        own_scores = not gated and scores_in_passes(None, backward=True)
        wide = not own_scores and (not gated or bool(CONFIG["a_form"]))
        BV = self.seq_block(CONFIG["bwd_state_BV"], wide=wide, sms=sms, fill=fill)
        if self.out_stages == 1 and self.seq_stages is None:
            # half precision at K = 256: double-buffered, the plain reverse pass outgrew shared memory
            # (241664 B) on an H200; single-staged at 32 value columns it hit an illegal memory access
            # (Triton 3.6); single-staged at 64 it ran right, plain and gated
            BV = max(BV, self.seq_block(64, wide=True))
        return BV, self.out_stages

    def seq_block(self, setting: Optional[int], wide: bool, sms: Optional[int] = None, fill: float = _FILL) -> int:
        """Value columns per program of a sequential pass: ``setting`` (CONFIG["BV"] or
        CONFIG["bwd_state_BV"]), or when None, 64 if ``wide`` and that still gives ``fill`` times
        the SMs a program, else 32."""
        full = max(16, next_power_of_2(self.V))
        if setting is None:
            if interpreting() and sms is None:
                return full  # few programs: the interpreter pays per program
            # 64 columns read the chunk's keys and W half as often as 32, but leave SMs idle when
            # N * H is small: on an H200 (132 SMs), plain, K = V = 128, 64 columns took the forward
            # from 0.96 to 0.76 ms with 128 programs (4 x 8192) and from 0.96 to 1.03 with 64 (2 x 16384)
            sms = sms or _sm_count(self.device)
            wide = wide and self.N * self.H * cdiv(self.V, 64) >= int(fill * sms)
            setting = 64 if wide else 32
        return min(setting, full)

    def seq_grid(self, BV: int) -> tuple:
        """Grid of a sequential pass at ``BV`` value columns per program: (value blocks, N * H)."""
        return cdiv(self.V, BV), self.N * self.H

    def key_splits(self, setting: int) -> tuple:
        """(splits, key columns per split) of bwd_dqk's grid: ``setting`` (CONFIG["bwd_dqk_split"])
        programs per chunk and head, at most one per BKP-wide key block, each taking whole blocks."""
        if not isinstance(setting, int) or setting < 1:
            raise ValueError(f"CONFIG['bwd_dqk_split'] must be an int >= 1; got {setting!r}")
        blocks = cdiv(self.K, self.BKP)
        per = cdiv(blocks, min(setting, blocks))
        return cdiv(blocks, per), per * self.BKP

    def common(self):
        return dict(H=self.H, K=self.K, V=self.V, BC=self.BC, NH=self.NH, VARLEN=self.varlen, DT=self.DT, F32=self.F32, PREC=self.PREC)


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=64)
def _varlen_tables(offsets: tuple, NH: int, BC: int, device: str):
    """Per sequence (first step, first global chunk); per chunk (first step, end step of its sequence)."""
    seqs, chunks = [], []
    for a, b in zip(offsets[:-1], offsets[1:]):
        seqs.append((a * NH, len(chunks)))
        for start in range(a * NH, b * NH, BC):
            chunks.append((start, b * NH))
    seqs.append((offsets[-1] * NH, len(chunks)))
    seq_t = torch.tensor(seqs, dtype=torch.int64, device=device).reshape(-1)
    chunk_t = torch.tensor(chunks or [(0, 0)], dtype=torch.int64, device=device).reshape(-1)
    return seq_t, chunk_t, len(chunks)


_DEVICE_TABLES: collections.OrderedDict = collections.OrderedDict()


def _device_tables_of(cu: torch.Tensor, NH: int, BC: int, slots: int, device):
    """``_device_varlen_tables`` of ``cu``, kept for the same tensor while it is unchanged.

    A model hands one cu_seqlens to every layer's forward and backward: the tables are then made
    once per batch, not a dozen small operations per call (on an H200 they cost the gated forward
    about 0.06 ms). The key is the tensor itself (a weak reference, so a new tensor at the same
    address is not mistaken for it) and its version counter, which in-place writes advance."""
    key = (id(cu), NH, BC, slots, str(device))
    hit = _DEVICE_TABLES.get(key)
    if hit is not None and hit[0]() is cu and hit[1] == cu._version:
        _DEVICE_TABLES.move_to_end(key)
        return hit[2]
    tables = _device_varlen_tables(cu.to(device), NH, BC, slots)
    _DEVICE_TABLES[key] = (weakref.ref(cu), cu._version, tables)
    while len(_DEVICE_TABLES) > 16:
        _DEVICE_TABLES.popitem(last=False)
    return tables


def _device_varlen_tables(cu: torch.Tensor, NH: int, BC: int, slots: int):
    """The tables of ``_varlen_tables`` from offsets on the device, by tensor operations (no read on
    the host); the chunk table has ``slots`` rows, those past the last real chunk empty (start = end)."""
    steps = cu.to(torch.int64) * NH
    chunks_per_seq = torch.div(steps[1:] - steps[:-1] + (BC - 1), BC, rounding_mode="floor")
    first = torch.cat((chunks_per_seq.new_zeros(1), torch.cumsum(chunks_per_seq, 0)))
    seq_t = torch.stack((steps, first), 1).reshape(-1)
    j = torch.arange(slots, dtype=torch.int64, device=cu.device)
    i = torch.searchsorted(first[1:], j, right=True).clamp_(max=steps.shape[0] - 2)
    real = j < first[-1]
    start = torch.where(real, steps[i] + (j - first[i]) * BC, steps[-1])
    end = torch.where(real, steps[i + 1], steps[-1])
    return seq_t, torch.stack((start, end), 1).reshape(-1)


def state_setting(gated: bool, want_o: bool, programs: int, sms: Optional[int]) -> str:
    """The CONFIG entry of the forward's sequential pass launched as ``programs`` programs: see
    CONFIG["state"]; ``sms``: the device's SM count (None under the interpreter)."""
    if not want_o:
        return setting_name("state_rerun", gated)
    return setting_name("state_few" if sms is not None and programs <= sms else "state", gated)


def prep_setting(scores: bool) -> str:
    """The CONFIG entry of the prep kernel's launch settings: where it writes the masked scores Aqk
    (``scores``) or not."""
    return "prep" if scores else "prep_no_scores"


def setting_name(name: str, gated: bool) -> str:
    """The CONFIG entry of kernel ``name``'s launch settings for the gated op or the plain one: the
    ``_gated`` entry where there is one."""
    return name + "_gated" if gated and name + "_gated" in CONFIG else name


def launch(name: str, kernel, grid, *args, max_stages=None, max_warps=None, **meta) -> None:
    """Launch ``kernel`` with the (num_warps, num_stages) of CONFIG[name], capped at ``max_warps`` and ``max_stages``."""
    # a GPU launch refuses keywords the kernel lacks, the interpreter ignores them: check here,
    # so that the tests on the CPU catch it too
    unknown = set(meta) - set(kernel.arg_names)
    if unknown:
        raise TypeError(f"kernel {kernel.__name__} takes no argument(s) {sorted(unknown)}")
    warps, stages = CONFIG[name]
    if max_stages is not None:
        stages = min(stages, max_stages)
    if max_warps is not None:
        warps = min(warps, max_warps)
    kernel[grid](*args, **meta, num_warps=warps, num_stages=stages)


GATE_MODES = (0, 1, 2, 3)


# the sequential passes: the forward's pass that writes the output, the backward's run of that pass
# again (without the output), and its reverse pass; and those each setting of
# CONFIG["prefetch_gates"] prefetches in
SEQUENTIAL_PASSES = ("output", "rerun", "reverse")
PREFETCH_SETTINGS = {
    False: (),
    "output": ("output",),
    "output+rerun": ("output", "rerun"),
    "output+reverse": ("output", "reverse"),
    True: SEQUENTIAL_PASSES,
}


def prefetch_gates(gmode: int, which: str) -> bool:
    """The sequential kernels' PREFETCH for the pass ``which`` (one of ``SEQUENTIAL_PASSES``) under
    the gate mode ``gmode`` (``gate_mode``): CONFIG["prefetch_gates"] names the passes
    (``PREFETCH_SETTINGS``), where the mode allows it (0, 3)."""
    if which not in SEQUENTIAL_PASSES:
        raise ValueError(f"which must be one of {SEQUENTIAL_PASSES}, got {which!r}")
    setting = CONFIG["prefetch_gates"]
    # (a bool or str only: 1 would match the key True)
    if not (isinstance(setting, (bool, str)) and setting in PREFETCH_SETTINGS):
        raise ValueError(f"CONFIG['prefetch_gates'] must be one of {tuple(PREFETCH_SETTINGS)}, got {setting!r}")
    return which in PREFETCH_SETTINGS[setting] and gmode in (0, 3)


def gate_mode(pp: "Prepped") -> int:
    """The sequential kernels' GMODE for the chunk quantities ``pp``: 0 (sum the gates there) when
    prep wrote neither the running log-decays nor the decays, else the mode prep wrote them for."""
    return 0 if pp.gcs is None else pp.gmode


DG_MODES = {"decays": 1, "chunk": 2}


def dg_mode(g) -> int:
    """The per-chunk backward kernels' DGM for a call with log-decays ``g``: 0 without a gate, else
    that of CONFIG["dg_form"] (DG_MODES)."""
    if g is None:
        return 0
    form = CONFIG["dg_form"]
    if form not in DG_MODES:
        raise ValueError(f"CONFIG['dg_form'] must be one of {sorted(DG_MODES)}, got {form!r}")
    return DG_MODES[form]


GATED_SCORES_SETTINGS = (False, True, "few-blocks", "auto")


def scores_in_passes(g, backward: bool, value_blocks: int = 1, programs: int = 0, sms: Optional[int] = None) -> bool:
    """Whether the sequential passes form the masked scores tril(Q K^T) o Gamma themselves rather
    than read prep's Aqk, for a call with log-decays ``g`` whose chunk quantities serve a
    ``backward`` too, and whose forward pass splits the value columns into ``value_blocks``
    programs per head, ``programs`` in all on a device of ``sms`` SMs (None: the interpreter):
    without a gate CONFIG["scores_in_passes"]; with one CONFIG["gated_scores_in_pass"]
    (``GATED_SCORES_SETTINGS``; "few-blocks": where each chunk's scores are formed at most twice;
    "auto": there, and where the programs outnumber the SMs), and where a backward follows only if
    the gate's gradient does not read Aqk (CONFIG["dg_from_aqk"]: with Aqk written anyway, forming
    the scores again only slows the passes)."""
    if g is None:
        return bool(CONFIG["scores_in_passes"])
    setting = CONFIG["gated_scores_in_pass"]
    if not (isinstance(setting, (bool, str)) and setting in GATED_SCORES_SETTINGS):
        raise ValueError(f"CONFIG['gated_scores_in_pass'] must be one of {GATED_SCORES_SETTINGS}, got {setting!r}")
    if not setting or (backward and CONFIG["dg_from_aqk"]):
        return False
    busy = setting == "auto" and sms is not None and programs > sms
    return setting is True or value_blocks <= 2 or busy


def pass_writes_scores(g, value_blocks: int, programs: int, sms: Optional[int]) -> bool:
    """Whether the forward's output pass of a gated call whose backward reads Aqk forms the scores
    and writes them for the backward (its first value block's programs), rather than prep writing
    them (CONFIG["pass_writes_scores"]): where it would form them in a forward with no backward
    (``scores_in_passes``; the arguments as there)."""
    if g is None or not CONFIG["pass_writes_scores"]:
        return False
    return scores_in_passes(g, backward=False, value_blocks=value_blocks, programs=programs, sms=sms)


def scores_writer(g, backward: bool, output_pass: bool, value_blocks: int = 1, programs: int = 0,
                  sms: Optional[int] = None) -> Optional[str]:
    """What writes the masked scores Aqk of a call (the arguments as for ``scores_in_passes``;
    ``output_pass``: the forward's output pass runs on prep's quantities): None where the passes
    form them and nothing writes them, "pass" (``pass_writes_scores``), "scores_kernel"
    (CONFIG["scores_kernel"]) or "prep"."""
    if scores_in_passes(g, backward=backward, value_blocks=value_blocks, programs=programs, sms=sms):
        return None
    if output_pass and pass_writes_scores(g, value_blocks=value_blocks, programs=programs, sms=sms):
        return "pass"
    return "scores_kernel" if CONFIG["scores_kernel"] else "prep"


def fused_backward(dgm: int) -> bool:
    """Whether the backward runs its per-chunk gradients in one kernel (CONFIG["fuse_bwd"]) for
    the gate-gradient mode ``dgm`` (``dg_mode``; 0: no gate)."""
    mode = int(CONFIG["fuse_bwd"])
    return mode == 2 or (mode == 1 and dgm != 1)


_SIDE_STREAMS: dict = {}


def side_stream(device) -> Optional["torch.cuda.Stream"]:
    """A second stream of ``device`` for launches that may run beside the current stream's, or None
    (CONFIG["overlap_passes"] off, or no CUDA device: the interpreter runs launches in order)."""
    device = torch.device(device)
    if not CONFIG["overlap_passes"] or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


@contextlib.contextmanager
def forked(side):
    """Launch the block's kernels on ``side``, after all the current stream's work so far (None: in place)."""
    if side is None:
        yield
        return
    side.wait_stream(torch.cuda.current_stream(side.device))
    with torch.cuda.stream(side):
        yield


def join(side) -> None:
    """Make the current stream's later work wait for everything launched on ``side`` (None: nothing)."""
    if side is not None:
        torch.cuda.current_stream(side.device).wait_stream(side)


def _g_arg(g, like):
    return g if g is not None else like  # never read when HAS_G is False


# -- forward ------------------------------------------------------------------------------


class Prepped(NamedTuple):
    """The prep kernel's chunk quantities: W (B, T_steps, H, K) and U (B, T_steps, H, V), or with
    CONFIG["a_form"] the chunk factors A (NT_total, H, BC, BC) in their place (the others None);
    the masked scores Aqk (NT_total, H, BC, BC; None where the sequential passes form them,
    ``scores_in_passes``); X (float32, or the inputs' dtype under CONFIG["x_half"]; None unless
    asked for) and, for
    the sequential passes (None without a gate, or when CONFIG["gates"] is 0: then they sum the
    log-decays themselves), float32: the running log-decays G inside each chunk (B, T_steps, H)
    under gates 1 and 2, or the chunk's decays (NT_total, H, 2 BC + BK) under 3 (``seq_decays``)."""

    w: Optional[torch.Tensor]
    u: Optional[torch.Tensor]
    a: Optional[torch.Tensor]
    aqk: Optional[torch.Tensor]
    xs: Optional[torch.Tensor]
    gcs: Optional[torch.Tensor]
    gmode: int = 0  # CONFIG["gates"] when prep wrote gcs
    # Aqk is allocated but not yet written: the forward's output pass forms the scores and writes
    # them there (CONFIG["pass_writes_scores"])
    scores_pending: bool = False


def prep(q, k, v, beta, g, plan: _Plan, save_x: bool = False, output_pass: bool = False) -> Prepped:
    """The chunk quantities of every chunk (``Prepped``), X only when ``save_x`` (for a backward;
    Aqk then as ``scores_in_passes`` says). ``output_pass``: the forward's pass that writes the
    output runs next on these, and may write Aqk in prep's place (``pass_writes_scores``)."""
    a_form = bool(CONFIG["a_form"])
    w = None if a_form else torch.empty_like(k)
    u = None if a_form else torch.empty_like(v)
    chunk_tiles = (plan.NT_total, plan.H, plan.BC, plan.BC)
    a = torch.empty(chunk_tiles, dtype=q.dtype, device=q.device) if a_form else None
    # the gated forward pass's grid, which decides where it forms its own scores
    blocks, heads = plan.seq_grid(plan.state_launch(True, want_o=True)[0]) if g is not None else (1, 0)
    sms = None if g is None or interpreting() else _sm_count(q.device)
    writer = scores_writer(g, save_x, output_pass, value_blocks=blocks, programs=blocks * heads, sms=sms)
    qk_out, pending, apart = writer == "prep", writer == "pass", writer == "scores_kernel"
    aqk = torch.empty(chunk_tiles, dtype=q.dtype, device=q.device) if writer is not None else None
    x_dtype = q.dtype if CONFIG["x_half"] else torch.float32
    xs = torch.empty((plan.NT_total, plan.H, plan.BC, plan.BC), dtype=x_dtype, device=q.device) if save_x else None
    mode = CONFIG["gates"]
    if mode not in GATE_MODES:
        raise ValueError(f"CONFIG['gates'] must be one of {GATE_MODES}, got {mode!r}")
    if g is None or not mode:
        gcs = None
    elif mode == 3:  # per chunk: e^G, e^{G_C - G} and e^{G_C} repeated along the state's key rows
        gcs = torch.empty((plan.NT_total, plan.H, 2 * plan.BC + plan.BK), dtype=torch.float32, device=q.device)
    else:
        gcs = torch.empty(beta.shape, dtype=torch.float32, device=q.device)
    dummy = beta  # stands for absent tensors; never read or written
    if plan.NT_total:
        launch(prep_setting(qk_out), _fwd.prep_kernel, (plan.NT_total, plan.H),
            q, k, v, beta, _g_arg(g, beta), dummy if a_form else w, dummy if a_form else u, a if a_form else dummy,
            aqk if qk_out else dummy, xs if save_x else dummy, gcs if gcs is not None else dummy,
            plan.chunks, plan.T_steps, plan.NT,
            BK=plan.BK, BKP=plan.BKP, BV=plan.BVP, HAS_G=g is not None, SAVE_X=save_x,
            SAVE_G=gcs is not None and mode != 3, SAVE_E=gcs is not None and mode == 3, FPREC=plan.FPREC,
            SPLITS=CONFIG["inverse_splits"], AFORM=a_form, QK_OUT=qk_out,
            **plan.common(),
        )
        if apart:
            launch("scores", _fwd.scores_kernel, (plan.NT_total, plan.H), q, k, _g_arg(g, beta), aqk,
                   plan.chunks, plan.T_steps, plan.NT, BKS=plan.BKP, HAS_G=g is not None, **plan.common())
    return Prepped(w, u, a, aqk, xs, gcs, mode if gcs is not None else 0, pending)


def state_pass(q, k, v, pp: Prepped, g, scale, S0, plan: _Plan, *, want_o=True, want_final=True, save_h=False,
               save_r=False):
    """The sequential pass: o (B, T, H, V), final states (N, H, K, V) float32, the per-chunk states
    (NT_total, H, K, V) and pseudo-values Vn (like v) when ``save_h``, and the residuals
    R = V - diag(e^G) K S (like v) when ``save_r`` (a_form only); absent ones None.

    ``pp``: the chunk quantities from ``prep`` (its running log-decays None: summed from g here;
    its Aqk, where ``scores_pending``, formed and written here: ``want_o`` only)."""
    a_form = pp.a is not None
    w, u, aqk, gcs = (pp.a, v, pp.aqk, pp.gcs) if a_form else (pp.w, pp.u, pp.aqk, pp.gcs)
    B, T, H, K, V = plan.B, plan.T, plan.H, plan.K, plan.V
    dev = q.device
    o = torch.empty((B, T, H, V), dtype=q.dtype, device=dev) if want_o else None
    sT = torch.empty((plan.N, H, K, V), dtype=torch.float32, device=dev) if want_final else None
    h = torch.empty((plan.NT_total, H, K, V), dtype=q.dtype, device=dev) if save_h else None
    vn = torch.empty_like(u) if save_h else None
    if save_r and not a_form:
        raise ValueError("the residuals R = V - diag(e^G) K S are formed only under CONFIG['a_form']")
    vr = torch.empty_like(v) if save_r else None
    if pp.scores_pending and not want_o:
        raise ValueError("the scores pending in prep's output are written by the pass that writes the output")
    dummy = u
    BV, stages = plan.state_launch(g is not None, want_o)
    grid = plan.seq_grid(BV)
    sms = None if interpreting() else _sm_count(dev)
    launch(state_setting(g is not None, want_o, grid[0] * grid[1], sms), _fwd.state_kernel, grid,
        q, k, w, u, aqk if aqk is not None else dummy, _g_arg(g, dummy), _g_arg(gcs, dummy), o if want_o else dummy, S0 if S0 is not None else dummy,
        sT if want_final else dummy, h if save_h else dummy, vn if save_h else dummy, vr if save_r else dummy,
        plan.seqs, plan.T_steps, plan.NT, scale,
        BK=plan.BK, BV=BV, HAS_G=g is not None, HAS_S0=S0 is not None, STORE_ST=want_final,
        WRITE_O=want_o, SAVE_H=save_h, GMODE=gate_mode(pp), GATE_V=bool(CONFIG["gate_values"]), AFORM=a_form,
        SAVE_R=save_r, PREFETCH=prefetch_gates(gate_mode(pp), "output" if want_o else "rerun"),
        QK_IN=aqk is None or pp.scores_pending, SCORES_OUT=pp.scores_pending, max_stages=stages, **plan.common(),
    )
    return o, sT, h, vn, vr


class Kept(NamedTuple):
    """What the forward keeps for the backward: the chunk quantities and, optionally, the states."""

    prepped: Prepped  # with X
    h: Optional[torch.Tensor]  # per-chunk states (None unless CONFIG["save_states"])
    vn: Optional[torch.Tensor]  # pseudo-values (likewise)
    vr: Optional[torch.Tensor]  # residuals R (likewise, and None unless ``residuals_wanted``)


def residuals_wanted(dgm: int) -> bool:
    """Whether the pass that writes the per-chunk states also writes the residuals R for the fused
    kernel (CONFIG["keep_residuals"]), for the gate-gradient mode ``dgm`` (``dg_mode``)."""
    return bool(CONFIG["keep_residuals"]) and bool(CONFIG["a_form"]) and fused_backward(dgm)


def _forward(q, k, v, beta, g, scale, S0, plan, want_final, keep=False, keep_states=False, dgm=0):
    """o and the final states; with ``keep``, also a ``Kept`` for the backward (else None), whose
    per-chunk states h, pseudo-values Vn and residuals R are None unless ``keep_states`` (R also
    unless ``residuals_wanted(dgm)``)."""
    pp = prep(q, k, v, beta, g, plan, save_x=keep, output_pass=True)
    keep_states = keep and keep_states
    o, sT, hs, vn, vr = state_pass(q, k, v, pp, g, scale, S0, plan, want_final=want_final, save_h=keep_states,
                                   save_r=keep_states and residuals_wanted(dgm))
    pp = pp._replace(scores_pending=False)  # the pass wrote them
    return o, sT, (Kept(pp, hs, vn, vr) if keep else None)


# -- autograd -----------------------------------------------------------------------------


class _DeltaRuleFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, beta, g, S0, scale, plan):
        bplan = _backward_plan(plan)
        keep = CONFIG["save_prep"] and bplan is plan  # another backward chunk size recomputes them anyway
        ctx.dgm = dg_mode(g)  # the gate gradient's form, decided here for the backward
        o, sT, prepped = _forward(q, k, v, beta, g, scale, S0, plan, want_final=True, keep=keep,
                                  keep_states=CONFIG["save_states"], dgm=ctx.dgm)
        ctx.save_for_backward(q, k, v, beta, g, S0)
        # Intermediates (never inputs or outputs, so no reference cycle) held on ctx rather than
        # saved: the backward drops each after its last reader, which saved tensors would not allow.
        ctx.prepped = prepped
        ctx.scale, ctx.plan = scale, bplan
        return o, sT

    @staticmethod
    def backward(ctx, do, dsT):
        q, k, v, beta, g, S0 = ctx.saved_tensors
        # handed over with no name left here: the callee's reference is then the only one, and
        # it drops W, U, Aqk after their last reader (a local here held them to the end: +0.3 GB peak)
        dq, dk, dv, dbeta, dg, dS0 = _bwd.backward(q, k, v, beta, g, S0, ctx.scale, ctx.plan, do, dsT,
                                                   _take_prepped(ctx), dgm=ctx.dgm)
        return dq, dk, dv, dbeta, dg, dS0, None, None


def _take_prepped(ctx):
    """The ``Kept`` of the forward, removed from ctx (None when nothing was kept)."""
    prepped, ctx.prepped = ctx.prepped, None
    return prepped


def _backward_plan(plan: _Plan) -> _Plan:
    """The plan of the backward pass: the forward's, or one of another chunk size (CONFIG["bwd_chunk"]),
    which then recomputes the chunk quantities on its own chunks."""
    BC = CONFIG["bwd_chunk"]
    if BC is None or BC == plan.BC:
        return plan
    B, T, H, K, V, NH, _, offsets, dtype, device, cu_seqlens = plan.args
    return _Plan(B, T, H, K, V, NH, BC, offsets, dtype, device, cu_seqlens)


def chunk(q, k, v, beta, g, scale: float, initial_state, offsets, chunk_size: int, num_householder: int = 1, cu_seqlens=None):
    """Chunkwise delta rule / DeltaProduct on Triton; same contract as torch_delta.chunk.

    Returns o (B, T, H, V) in the promoted dtype of q, k, v and the final
    states (N, H, K, V) in float32.
    """
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if dtype not in _TL:
        raise TypeError(
            f"backend 'triton' takes float32, bfloat16 or float16 q, k, v; got {dtype} (use backend='torch' for float64)"
        )
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size must be one of {CHUNK_SIZES} on backend 'triton'; got {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    if K > MAX_K:
        raise ValueError(f"backend 'triton' supports K <= {MAX_K} (the state's key dimension lives in registers); got K = {K}")
    q, k, v = (x.to(dtype).contiguous() for x in (q, k, v))
    beta = beta.contiguous()
    g = None if g is None else g.contiguous()
    S0 = None if initial_state is None else initial_state.contiguous()
    plan = _Plan(B, T, H, K, V, num_householder, chunk_size, offsets, dtype, q.device,
                 cu_seqlens if offsets is None else None)
    inputs = [x for x in (q, k, v, beta, g, S0) if x is not None]
    if torch.is_grad_enabled() and any(x.requires_grad for x in inputs):
        o, sT = _DeltaRuleFunction.apply(q, k, v, beta, g, S0, scale, plan)
    else:
        o, sT, _ = _forward(q, k, v, beta, g, scale, S0, plan, want_final=True)
    return o, sT


def recurrent(q, k, v, beta, g, scale: float, initial_state, offsets, num_householder: int = 1, cu_seqlens=None):
    """Token-by-token delta rule (decoding): one chunk of 16 steps at a time through the same kernels."""
    return chunk(q, k, v, beta, g, scale, initial_state, offsets, 16, num_householder, cu_seqlens)
