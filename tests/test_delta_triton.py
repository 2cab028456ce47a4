"""The delta rule's Triton kernels against the float64 recurrence (values) and the torch path (gradients).

Without a GPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py) on
tiny shapes; with one, on CUDA tensors.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import householder as hh  # noqa: E402
from householder import reference as ref  # noqa: E402

from tests.test_delta_torch import make_inputs as float64_inputs  # noqa: E402

pytestmark = pytest.mark.interpret

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Two launch variants of the same float32 computation agree to this: exactly-rounded products in
# the interpreter; 3xTF32 tensor-core products, summed in other orders, on a GPU (1.06e-6 was seen
# on an H200 between the gate modes)
SAME = 1e-6 if DEVICE == "cpu" else 1e-5


def make_inputs(rng, B, T, H, K, V, *, n=1, gated=True, state=None, dtype=torch.float32):
    """The torch tests' inputs, with q, k, v in ``dtype`` and the rest float32, on DEVICE."""
    base = float64_inputs(rng, B, T, H, K, V, n=n, gated=gated, state=state)
    return {name: a.to(dtype if name in ("q", "k", "v") else torch.float32).to(DEVICE) for name, a in base.items()}


def backward_case(rng, B, T, H, K, V, *, n=1, gated=True, cu=None, dtype=torch.float32):
    """One backward test case on DEVICE: inputs (``make_inputs``, initial states for each of the N
    sequences), cu_seqlens as a tensor (None for B equal sequences), dO (B, T, H, V) in ``dtype``
    and the final states' gradient (N, H, K, V) float32."""
    N = B if cu is None else len(cu) - 1
    inp = make_inputs(rng, B, T, H, K, V, n=n, gated=gated, state=N, dtype=dtype)
    cu_t = None if cu is None else torch.tensor(cu, device=DEVICE)
    do = torch.tensor(rng.standard_normal((B, T, H, V)), dtype=dtype, device=DEVICE)
    dS = torch.tensor(rng.standard_normal((N, H, K, V)), dtype=torch.float32, device=DEVICE)
    return inp, cu_t, do, dS


def grads_under(monkeypatch, settings, inp, n, cu_t, do, dS, chunk):
    """``_grads`` of the Triton path once under each dict of triton_delta.CONFIG entries in ``settings``."""
    from householder.backends import triton_delta as td

    runs = []
    for setting in settings:
        for key, value in setting.items():
            monkeypatch.setitem(td.CONFIG, key, value)
        runs.append(_grads(inp, "triton", n, cu_t, do, dS, chunk))
    return runs


def assert_alike(runs, inp, n, cu_t, do, dS, same):
    """Every run of ``grads_under`` within ``same`` of the first, and each within 2e-4 of the float64 torch path."""
    want = _grads({k: x.double() for k, x in inp.items()}, "torch", n, cu_t, do.double(), dS.double(), 64)
    for name, a, *others, d in zip(["o", "S"] + [f"d{m}" for m in inp], *runs, want):
        for b in others:
            assert rel_err(a, b) < same, name
        for b in (a, *others):
            assert rel_err(b, d) < 2e-4, name


def rel_err(a, b) -> float:
    a = a.detach().double().cpu().numpy() if hasattr(a, "detach") else a
    b = b.detach().double().cpu().numpy() if hasattr(b, "detach") else b
    assert a.shape == b.shape and np.all(np.isfinite(a))
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


def ref_of(inp, n=1, cu=None, scale=None):
    rest = {k: v for k, v in inp.items() if k in ("g", "initial_state")}
    return ref.delta_product(inp["q"], inp["k"], inp["v"], inp["beta"], n, scale=scale, cu_seqlens=cu, **rest)


@pytest.mark.parametrize(
    "B, T, H, K, V, n, chunk, gated",
    [
        (1, 37, 2, 16, 24, 1, 16, True),  # T not a multiple of the chunk, K != V, H > 1
        (2, 20, 1, 8, 8, 1, 16, False),  # K, V below the 16-wide tiles
        (1, 70, 1, 32, 16, 1, 64, True),  # the 64 chunk: all four diagonal blocks and their coupling
        (1, 11, 2, 16, 16, 3, 32, True),  # DeltaProduct: chunks cut through tokens
    ],
)
def test_forward_matches_reference(rng, B, T, H, K, V, n, chunk, gated):
    inp = make_inputs(rng, B, T, H, K, V, n=n, gated=gated, state=B)
    o, S = hh.delta_product(**inp, num_householder=n, output_final_state=True, chunk_size=chunk, backend="triton")
    ro, rS = ref_of(inp, n)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert rel_err(o, ro) < 1e-4
    assert rel_err(S, rS) < 1e-4


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("n", [1, 2])
def test_varlen_forward_matches_reference(rng, n, chunk):
    # chunk 64 with n = 2: the forward of test_backward_may_use_another_chunk_size, alone
    cu = [0, 5, 5, 22, 40]
    inp = make_inputs(rng, 1, cu[-1], 2, 16, 8, n=n, state=len(cu) - 1)
    o, S = hh.delta_product(
        **inp, num_householder=n, cu_seqlens=torch.tensor(cu, device=DEVICE), output_final_state=True,
        chunk_size=chunk, backend="triton",
    )
    ro, rS = ref_of(inp, n, cu=cu)
    assert rel_err(o, ro) < 1e-4
    assert rel_err(S, rS) < 1e-4


@pytest.mark.parametrize("beta_value", [0.0, 2.0])
def test_beta_edges_and_scale(rng, beta_value):
    inp = make_inputs(rng, 1, 24, 1, 16, 16, state=1)
    inp["beta"] = torch.full_like(inp["beta"], beta_value)
    o, S = hh.delta_rule(**inp, scale=0.3, output_final_state=True, chunk_size=16, backend="triton")
    ro, rS = ref_of(inp, scale=0.3)
    assert rel_err(o, ro) < 1e-4
    assert rel_err(S, rS) < 1e-4


def test_half_inputs_give_half_outputs(rng):
    inp = make_inputs(rng, 1, 20, 2, 16, 16, state=1, dtype=torch.bfloat16)
    o, S = hh.delta_rule(**inp, output_final_state=True, chunk_size=16, backend="triton")
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    ro, rS = ref_of(inp)  # the reference sees the rounded inputs
    assert rel_err(o, ro) < 3e-2
    assert rel_err(S, rS) < 3e-2


def _grads(inp, backend, n, cu, do, dS, chunk):
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inp.items()}
    o, S = hh.delta_product(
        **leaves, num_householder=n, cu_seqlens=cu, output_final_state=True, chunk_size=chunk, backend=backend
    )
    grads = torch.autograd.grad((o * do).sum() + (S * dS).sum(), list(leaves.values()))
    return [o, S, *grads]


@pytest.mark.parametrize(
    "B, T, H, K, V, n, chunk, gated, cu",
    [
        (2, 37, 2, 8, 24, 1, 16, True, None),
        (1, 40, 1, 16, 16, 1, 32, False, None),
        (1, 13, 2, 8, 8, 3, 16, True, None),
        (1, 30, 2, 16, 8, 2, 16, True, [0, 7, 7, 30]),
    ],
)
def test_backward_matches_torch_path(rng, B, T, H, K, V, n, chunk, gated, cu):
    inp, cu_t, do, dS = backward_case(rng, B, T, H, K, V, n=n, gated=gated, cu=cu)
    got = _grads(inp, "triton", n, cu_t, do, dS, chunk)
    # the torch path in float64 is the reference for gradients (itself gradchecked)
    want = _grads({k: x.double() for k, x in inp.items()}, "torch", n, cu_t, do.double(), dS.double(), 64)
    names = ["o", "S"] + [f"d{name}" for name in inp]
    for name, a, b in zip(names, got, want):
        assert a.dtype == (torch.float32), name
        assert rel_err(a, b) < 2e-4, name


DG_FORMS = ("decays", "chunk")


@pytest.mark.parametrize("form", DG_FORMS)
@pytest.mark.parametrize("final", [False, True], ids=["output-only", "final-state"])
def test_gate_gradient_with_or_without_the_final_state(rng, monkeypatch, form, final):
    # the chunk form takes sum(S_C o dS_C) where each chunk ends, the last one's from the final
    # state's gradient: that alone (do = 0), or none at all (the final state not asked for), must
    # both come out
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "dg_form", form)
    cu = [0, 9, 9, 40]
    inp = make_inputs(rng, 1, 40, 2, 16, 8, n=2, state=3)
    cu_t = torch.tensor(cu, device=DEVICE)
    want_inp = {k: x.detach().double().requires_grad_() for k, x in inp.items()}
    got_inp = {k: x.detach().clone().requires_grad_() for k, x in inp.items()}
    outs = []
    for leaves, backend in ((got_inp, "triton"), (want_inp, "torch")):
        o, S = hh.delta_product(**leaves, num_householder=2, cu_seqlens=cu_t, output_final_state=final,
                                chunk_size=16, backend=backend)
        loss = S.sum() if final else o.pow(2).sum()
        outs.append(torch.autograd.grad(loss, [leaves["g"], leaves["q"]], allow_unused=True))
    (dg, dq), (want_dg, want_dq) = outs
    assert rel_err(dg, want_dg) < 2e-4
    if final:
        assert dq is None or float(dq.abs().max()) == 0.0  # the queries only reach the output
    else:
        assert rel_err(dq, want_dq) < 2e-4


@pytest.mark.parametrize("form", DG_FORMS)
def test_gate_gradient_form_is_fixed_by_the_forward(rng, monkeypatch, form):
    # CONFIG["dg_form"] changed between the passes must not mix the forms (each kernel computes
    # one form whole); and the returned final state is not saved, so writing it in place before
    # the backward is allowed
    from householder.backends import triton_delta as td

    inp = make_inputs(rng, 1, 37, 2, 16, 8, state=1)
    leaves = {k: x.detach().clone().requires_grad_() for k, x in inp.items()}
    monkeypatch.setitem(td.CONFIG, "dg_form", form)
    o, S = hh.delta_rule(**leaves, output_final_state=True, chunk_size=16, backend="triton")
    monkeypatch.setitem(td.CONFIG, "dg_form", "decays" if form == "chunk" else "chunk")
    loss = o.pow(2).sum() + S.sum()  # the sum saves nothing of S
    S.detach().mul_(1.0)  # an in-place write to the output (a cache update, say)
    (dg,) = torch.autograd.grad(loss, [leaves["g"]])
    want = {k: x.detach().double().requires_grad_() for k, x in inp.items()}
    wo, wS = hh.delta_rule(**want, output_final_state=True, backend="torch")
    (want_dg,) = torch.autograd.grad(wo.pow(2).sum() + wS.sum(), [want["g"]])
    assert rel_err(dg, want_dg) < 2e-4


def test_gradients_reach_every_input_in_bfloat16(rng):
    inp = make_inputs(rng, 1, 20, 1, 16, 16, state=1, dtype=torch.bfloat16)
    leaves = {name: x.requires_grad_() for name, x in inp.items()}
    o, S = hh.delta_rule(**leaves, output_final_state=True, chunk_size=16, backend="triton")
    (o.float().sum() + S.sum()).backward()
    for name, x in leaves.items():
        assert x.grad is not None and x.grad.dtype == x.dtype and bool(torch.isfinite(x.grad).all()), name
    want = _grads({k: x.detach().double() for k, x in inp.items()}, "torch", 1, None, torch.ones_like(o, dtype=torch.float64), torch.ones_like(S, dtype=torch.float64), 64)
    for (name, x), w in zip(leaves.items(), want[2:]):
        assert rel_err(x.grad, w) < 5e-2, name


def test_recurrent_decoding_steps(rng):
    inp = make_inputs(rng, 2, 6, 2, 16, 8, n=2, state=2)
    o, S = hh.delta_rule_recurrent(**inp, num_householder=2, backend="triton")
    ro, rS = ref_of(inp, 2)
    assert rel_err(o, ro) < 1e-4
    assert rel_err(S, rS) < 1e-4


def test_triton_refuses_what_it_cannot_run(rng):
    inp = make_inputs(rng, 1, 8, 1, 16, 16)
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        hh.delta_rule(**inp, chunk_size=48, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        hh.delta_rule(**{k: x.double() for k, x in inp.items()}, backend="triton")


def test_offsets_left_on_the_device_give_the_same_tables():
    # cu_seqlens on a GPU under check_finite=False: the chunk tables are made by tensor operations,
    # with a chunk row for as many chunks as any sequences of that length can have
    from householder.backends import triton_delta as td

    for offsets, NH, BC in (([0, 7, 7, 30, 50], 2, 16), ([0, 64, 65], 1, 64), ([0, 0], 3, 32), ([0, 5], 1, 16)):
        seqs, chunks, n_real = td._varlen_tables(tuple(offsets), NH, BC, "cpu")
        slots = -(-offsets[-1] * NH // BC) + len(offsets) - 1
        dseqs, dchunks = td._device_varlen_tables(torch.tensor(offsets, dtype=torch.int32), NH, BC, slots)
        assert torch.equal(dseqs, seqs)
        assert torch.equal(dchunks[: 2 * n_real], chunks[: 2 * n_real])
        assert dchunks.shape == (2 * slots,) and bool((dchunks[2 * n_real :] == offsets[-1] * NH).all())


def test_device_tables_are_kept_for_an_unchanged_tensor_only():
    # one cu_seqlens serves every layer of a model: its tables are made once, and made again when
    # the tensor is written in place or another tensor comes
    from householder.backends import triton_delta as td

    cu = torch.tensor([0, 20, 50], device=DEVICE)
    first = td._device_tables_of(cu, 1, 16, 6, torch.device(DEVICE))
    assert td._device_tables_of(cu, 1, 16, 6, torch.device(DEVICE)) is first
    cu[1] = 30
    again = td._device_tables_of(cu, 1, 16, 6, torch.device(DEVICE))
    assert again is not first
    assert torch.equal(again[1], td._device_varlen_tables(cu, 1, 16, 6)[1])
    other = cu.clone()
    assert td._device_tables_of(other, 1, 16, 6, torch.device(DEVICE)) is not again


# the programs of the chunk rows past the real chunks read per-chunk states that no pass wrote
# (uninitialised memory, which numpy may find overflows in); they store nothing, which this checks
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_offsets_left_on_the_device_give_the_same_results(rng, gated):
    # the backends called as delta_rule calls them for unchecked offsets on a GPU (offsets None,
    # the tensor given): extra chunk programs of the Triton kernels must store nothing
    from householder.backends import torch_delta
    from householder.backends import triton_delta as td

    cu = [0, 7, 7, 30, 50]
    inp = make_inputs(rng, 1, 50, 2, 16, 8, n=2, gated=gated, state=4)
    cu_t = torch.tensor(cu, device=DEVICE)
    do = torch.tensor(rng.standard_normal((1, 50, 2, 8)), dtype=torch.float32, device=DEVICE)
    for ops, chunk in ((td, 16), (torch_delta, 16)):
        runs = []
        for offsets, tensor in ((cu, None), (None, cu_t)):
            leaves = {name: x.detach().clone().requires_grad_(x is not None) for name, x in inp.items() if x is not None}
            o, S = ops.chunk(leaves["q"], leaves["k"], leaves["v"], leaves["beta"], leaves.get("g"), 0.25,
                             leaves["initial_state"], offsets, chunk, 2, cu_seqlens=tensor)
            runs.append([o, S, *torch.autograd.grad((o * do).sum() + S.sum(), list(leaves.values()))])
        for name, a, b in zip(["o", "S"] + [f"d{n}" for n in inp], *runs):
            assert rel_err(a, b) < SAME, (ops.__name__, name)


def test_backward_may_use_another_chunk_size(rng, monkeypatch):
    # The backward recomputes everything, so it can run on other chunks than the forward
    # (CONFIG["bwd_chunk"]; by default the forward's).
    from householder.backends import triton_delta as td

    plan = td._Plan(1, 40, 1, 64, 64, 1, 64, None, torch.bfloat16, torch.device(DEVICE))
    assert td._backward_plan(plan) is plan
    monkeypatch.setitem(td.CONFIG, "bwd_chunk", 16)
    assert td._backward_plan(plan).BC == 16
    cu = [0, 23, 23, 50]
    inp = make_inputs(rng, 1, 50, 2, 16, 16, n=2, state=3)
    cu_t = torch.tensor(cu, device=DEVICE)
    do = torch.tensor(rng.standard_normal((1, 50, 2, 16)), dtype=torch.float32, device=DEVICE)
    dS = torch.tensor(rng.standard_normal((3, 2, 16, 16)), dtype=torch.float32, device=DEVICE)
    got = _grads(inp, "triton", 2, cu_t, do, dS, 64)
    want = _grads({k: x.double() for k, x in inp.items()}, "torch", 2, cu_t, do.double(), dS.double(), 64)
    for name, a, b in zip(["o", "S"] + [f"d{n}" for n in inp], got, want):
        assert rel_err(a, b) < 2e-4, name


@pytest.mark.parametrize("n, cu", [(1, None), (2, [0, 23, 23, 50])])
def test_backward_keeps_or_recomputes_the_chunk_quantities_alike(rng, monkeypatch, n, cu):
    # CONFIG["save_prep"]: the forward's W, U, Aqk, X kept for the backward, or recomputed there;
    # CONFIG["save_states"]: the per-chunk states and pseudo-values kept too.
    # Both run the same kernels on the same chunks, so the gradients agree to rounding.
    from householder.backends import triton_delta as td

    inp, cu_t, do, dS = backward_case(rng, 1, 50, 2, 16, 16, n=n, cu=cu)
    runs = []
    for keep, states in ((True, False), (True, True), (False, False)):
        monkeypatch.setitem(td.CONFIG, "save_prep", keep)
        monkeypatch.setitem(td.CONFIG, "save_states", states)
        runs.append(_grads(inp, "triton", n, cu_t, do, dS, 32))
    want = _grads({k: x.double() for k, x in inp.items()}, "torch", n, cu_t, do.double(), dS.double(), 64)
    for name, a, b, c, d in zip(["o", "S"] + [f"d{m}" for m in inp], *runs, want):
        assert rel_err(a, b) < SAME and rel_err(a, c) < SAME, name
        assert rel_err(a, d) < 2e-4, name


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("n, cu", [(1, None), (2, [0, 23, 23, 50])], ids=["delta", "product-varlen"])
def test_fused_backward_takes_the_residuals_or_forms_k_s_alike(rng, monkeypatch, gated, n, cu):
    # CONFIG["keep_residuals"]: the fused kernel's dA state term from the residuals R = V - e^G K S
    # written by the pass that writes the states (in the backward's rerun, or kept by the forward
    # with save_states), or from K S formed again; CONFIG["dw_from_dv"]: dk's A^T dW as -dV S^T from
    # the kernel's own dV, or from dW; CONFIG["dg_rows_mma"]: the gate's row sums with K and Q taken
    # through products with the identity; the same terms summed in another order.
    from householder.backends import triton_delta as td

    inp, cu_t, do, dS = backward_case(rng, 1, 50, 2, 16, 24, n=n, gated=gated, cu=cu)
    used = []

    def spy(name, kernel, *args, **meta):
        if name.startswith("bwd_fused"):
            used.append((meta["HAS_R"], meta["DW_FROM_DV"], meta["DG_MMA"]))
        return launch(name, kernel, *args, **meta)

    launch = td.launch
    monkeypatch.setattr(td, "launch", spy)
    monkeypatch.setitem(td.CONFIG, "save_prep", True)
    settings = ((False, False, False, False), (True, False, False, True), (True, True, True, False), (False, False, True, True))
    keys = ("keep_residuals", "save_states", "dw_from_dv", "dg_rows_mma")
    runs = grads_under(monkeypatch, [dict(zip(keys, s)) for s in settings], inp, n, cu_t, do, dS, 16)
    assert used == [(r, d, m) for r, _, d, m in settings]
    assert_alike(runs, inp, n, cu_t, do, dS, 10 * SAME)


def test_residuals_need_the_factor_form(rng, monkeypatch):
    # W and U in memory (a_form off): the passes never form R, so the backward falls back to K S
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "a_form", False)
    assert not td.residuals_wanted(td.dg_mode(None))
    monkeypatch.setitem(td.CONFIG, "a_form", True)
    assert td.residuals_wanted(td.dg_mode(None))
    monkeypatch.setitem(td.CONFIG, "fuse_bwd", 1)  # gated, decays form: two kernels, which read no R
    assert not td.residuals_wanted(td.DG_MODES["decays"])
    inp = make_inputs(rng, 1, 20, 1, 16, 16, gated=False)
    plan = td._Plan(1, 20, 1, 16, 16, 1, 16, None, torch.float32, inp["q"].device)
    monkeypatch.setitem(td.CONFIG, "a_form", False)
    pp = td.prep(inp["q"], inp["k"], inp["v"], inp["beta"], None, plan)
    with pytest.raises(ValueError, match="a_form"):
        td.state_pass(inp["q"], inp["k"], inp["v"], pp, None, 0.25, None, plan, save_r=True)


@pytest.mark.parametrize("key, bad", [("gates", 4), ("prefetch_gates", "yes"), ("prefetch_gates", 1)])
def test_gate_settings_refuse_unknown_values(rng, monkeypatch, key, bad):
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, key, bad)
    inp = make_inputs(rng, 1, 20, 1, 16, 16)
    with pytest.raises(ValueError, match=rf"CONFIG\['{key}'\] must be one of .*got {bad!r}"):
        hh.delta_rule(**inp, chunk_size=16, backend="triton")


def test_each_sequential_pass_takes_its_own_launch_settings():
    # the forward's output pass at few programs (no more than the SMs) takes state_few(_gated), at
    # more state(_gated); the plain rerun state_rerun, the gated one state_rerun_gated; the interpreter
    # (no SM count) the default of many programs
    from householder.backends import triton_delta as td

    assert td.state_setting(False, True, 128, 132) == "state_few"
    assert td.state_setting(False, True, 133, 132) == "state"
    assert td.state_setting(False, True, 128, None) == "state"
    assert td.state_setting(False, False, 128, 132) == "state_rerun"
    assert td.state_setting(True, True, 128, 132) == "state_few_gated"
    assert td.state_setting(True, True, 133, 132) == td.state_setting(True, True, 1, None) == "state_gated"
    assert td.state_setting(True, False, 1, 132) == "state_rerun_gated"
    assert td.setting_name("bwd_state", True) == "bwd_state_gated" and td.setting_name("bwd_state", False) == "bwd_state"
    assert td.setting_name("prep", True) == "prep"
    assert td.prep_setting(True) == "prep" and td.prep_setting(False) == "prep_no_scores"  # writing Aqk or not
    for name in ("state", "state_few", "state_rerun", "state_gated", "state_few_gated", "state_rerun_gated", "bwd_state_gated",
                 "bwd_fused_gated", "prep", "prep_no_scores"):
        warps, stages = td.CONFIG[name]
        assert warps in (1, 2, 4, 8) and stages >= 1, name


def test_prefetch_names_its_passes(monkeypatch):
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "prefetch_gates", "output+reverse")
    assert [td.prefetch_gates(0, p) for p in td.SEQUENTIAL_PASSES] == [True, False, True]
    assert [td.prefetch_gates(1, p) for p in td.SEQUENTIAL_PASSES] == [False] * 3  # mode 1 loads G, not ahead
    with pytest.raises(ValueError, match=r"which must be one of \('output', 'rerun', 'reverse'\), got 'forward'"):
        td.prefetch_gates(0, "forward")


def test_benchmark_settings_parse_by_the_kind_of_each_entry(monkeypatch):
    # compare_delta.py --set / --ab: words, numbers, (warps, stages) pairs and None, by the entry's
    # current kind; prefetch_gates takes True, False or the names of passes
    from benchmarks.compare_delta import apply_settings
    from householder.backends import triton_delta as td

    cases = [("prefetch_gates", "False", False), ("prefetch_gates", "True", True), ("prefetch_gates", "output", "output"),
             ("prefetch_gates", "output+reverse", "output+reverse"),
             ("gates", "3", 3), ("save_states", "1", True), ("keep_residuals", "False", False),
             ("bwd_fused_gated", "8,1", (8, 1)), ("BV", "None", None), ("BV", "32", 32), ("dg_form", "chunk", "chunk")]
    for key, text, want in cases:
        monkeypatch.setitem(td.CONFIG, key, td.CONFIG[key])  # restored after the test
        apply_settings([f"{key}={text}"])
        assert td.CONFIG[key] == want and type(td.CONFIG[key]) is type(want), (key, text)
        monkeypatch.undo()


def test_benchmark_joint_variants_parse():
    # compare_delta.py --ab-joint: variants separated by '|', each KEY=VALUE items separated by spaces
    from benchmarks.compare_delta import joint_variants

    got = joint_variants("prep=2,1 bwd_fused_gated=4,2 | prep=1,1 bwd_fused_gated=8,1")
    assert got == [("prep=2,1 bwd_fused_gated=4,2", ["prep=2,1", "bwd_fused_gated=4,2"]),
                   ("prep=1,1 bwd_fused_gated=8,1", ["prep=1,1", "bwd_fused_gated=8,1"])]
    for bad in ("prep=2,1|", "prep 2,1"):
        with pytest.raises(SystemExit, match="--ab-joint"):
            joint_variants(bad)


def test_benchmark_report_says_when_a_run_was_stopped(tmp_path):
    # compare_delta.py under `timeout`: SIGTERM appends a line saying the report is cut short
    import signal

    from benchmarks.compare_delta import STOPPED, stop_marker

    out = tmp_path / "report.md"
    out.write_text("| delta | 16 x 2048 | 0.332 |\n")
    with pytest.raises(SystemExit) as info:
        stop_marker(str(out))(signal.SIGTERM, None)
    assert info.value.code == 124
    assert out.read_text() == "| delta | 16 x 2048 | 0.332 |\n\n" + STOPPED + "\n"
    with pytest.raises(SystemExit):  # before the first write: nothing to mark, no file made
        stop_marker(str(tmp_path / "none.md"))(signal.SIGTERM, None)
    assert not (tmp_path / "none.md").exists()


def test_kernel_resources_lists_the_launchers_choices_per_batch(monkeypatch):
    # benchmarks/kernel_resources.py --batch: the kernels of one forward+backward and the settings
    # the launchers pick for B sequences of 16 heads on 132 SMs (listed without compiling here)
    from benchmarks.kernel_resources import kernels
    from householder.backends import triton_delta as td

    for key, value in dict(BV=None, scores_kernel=True, gated_scores_in_pass="few-blocks", pass_writes_scores=True,
                           fuse_bwd=2).items():
        monkeypatch.setitem(td.CONFIG, key, value)
    short = {(name, variant): (meta.get("BV"), launch) for name, variant, _, meta, launch in kernels(128, 64, 16)}
    long_ = {(name, variant): (meta.get("BV"), launch) for name, variant, _, meta, launch in kernels(128, 64, 2)}
    # 16 x 16 heads: 64 value columns, the pass forms (and writes) the gated scores, no scores kernel
    assert short[("state", "gated")] == (64, td.CONFIG["state_gated"]) and ("scores", "gated") not in short
    # 2 x 16 heads: 32 columns at the few-programs setting, and the scores kernel writes Aqk
    assert long_[("state", "gated")] == (32, td.CONFIG["state_few_gated"]) and ("scores", "gated") in long_
    assert ("scores", "plain") not in long_  # the plain passes form their scores at every shape


def test_passes_side_by_side_only_on_a_gpu(monkeypatch):
    # CONFIG["overlap_passes"] puts the reverse pass on a second stream of a CUDA device; the
    # interpreter (CPU tensors) runs every launch in order on none
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "overlap_passes", True)
    assert td.side_stream(torch.device("cpu")) is None
    if torch.cuda.is_available():
        side = td.side_stream(torch.device("cuda"))
        assert side is not None and side != torch.cuda.current_stream()
        assert td.side_stream(torch.device("cuda")) is side  # one per device, made once
    monkeypatch.setitem(td.CONFIG, "overlap_passes", False)
    assert td.side_stream(torch.device(DEVICE)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="two streams need a CUDA device")
@pytest.mark.parametrize("gated, n, cu, keep", [(True, 1, None, True), (False, 2, None, False), (True, 1, [0, 700, 700, 2048], True)])
def test_passes_side_by_side_give_the_same_gradients(rng, monkeypatch, gated, n, cu, keep):
    # The reverse pass on a second stream beside the forward's pass run again runs the same kernels
    # on the same inputs: the same bits, also from a caller's own stream, and again when the
    # allocator hands the freed buffers out on later calls.
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "save_prep", keep)
    monkeypatch.setitem(td.CONFIG, "save_states", False)
    N = 1 if cu is None else len(cu) - 1
    B = 1 if cu is not None else 2
    inp = make_inputs(rng, B, 2048 // n, 4, 64, 64, n=n, gated=gated, state=N if cu else B, dtype=torch.bfloat16)
    cu_t = None if cu is None else torch.tensor(cu, device=DEVICE)
    do = torch.tensor(rng.standard_normal((B, 2048 // n, 4, 64)), dtype=torch.bfloat16, device=DEVICE)
    dS = torch.tensor(rng.standard_normal((N if cu else B, 4, 64, 64)), dtype=torch.float32, device=DEVICE)
    monkeypatch.setitem(td.CONFIG, "overlap_passes", False)
    want = _grads(inp, "triton", n, cu_t, do, dS, 64)
    monkeypatch.setitem(td.CONFIG, "overlap_passes", True)
    runs = [_grads(inp, "triton", n, cu_t, do, dS, 64) for _ in range(3)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        runs.append(_grads(inp, "triton", n, cu_t, do, dS, 64))
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for got in runs:
        for name, a, b in zip(["o", "S"] + [f"d{m}" for m in inp], got, want):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("gates", [1, 2, 3])
@pytest.mark.parametrize("n, cu", [(1, None), (2, [0, 7, 7, 30, 50])], ids=["delta", "product-varlen"])
def test_sequential_passes_take_the_gates_from_any_source_alike(rng, monkeypatch, gates, n, cu):
    # CONFIG["gates"]: the running log-decays summed in the sequential kernels (0) or written by
    # the prep kernel and loaded there (1, 2), or the decays written by it (3); CONFIG["gate_values"]:
    # the decays applied to the keys and queries or to the value-side tiles; CONFIG["prefetch_gates"]:
    # loaded a chunk ahead (modes 0 and 3) in every pass, in the output's, or there and in the
    # backward's rerun or reverse pass; a short last chunk and an empty sequence included
    inp, cu_t, do, dS = backward_case(rng, 1, 50, 2, 16, 16, n=n, cu=cu)
    settings = ((0, False, False, False), (gates, False, False, False), (gates, True, True, False), (0, False, True, False),
                (0, False, False, True), (gates, False, True, True), (gates, False, False, "output"),
                (gates, False, False, "output+rerun"), (0, False, False, "output+reverse"))
    keys = ("gates", "save_states", "gate_values", "prefetch_gates")
    runs = grads_under(monkeypatch, [dict(zip(keys, s)) for s in settings], inp, n, cu_t, do, dS, 32)
    assert_alike(runs, inp, n, cu_t, do, dS, SAME)


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
@pytest.mark.parametrize("n, cu", [(1, None), (2, [0, 7, 7, 30, 50])], ids=["delta", "product-varlen"])
def test_sequential_passes_take_the_factor_or_w_and_u_alike(rng, monkeypatch, gated, n, cu):
    # CONFIG["a_form"]: the sequential passes form Vn = A (V - diag(e^G) K S) from the chunk factor,
    # or Vn = U - W S from the prep kernel's W and U; kept, recomputed, with the states kept, and
    # with the gates loaded and applied to the value-side tiles; a short last chunk and an empty
    # sequence included. The products are associated differently, so they agree to float32 rounding.
    inp, cu_t, do, dS = backward_case(rng, 1, 50, 2, 16, 16, n=n, gated=gated, cu=cu)
    settings = [
        dict(a_form=False),
        dict(a_form=True),
        dict(a_form=True, save_prep=False),
        dict(a_form=True, save_states=True, gates=1, gate_values=True),
    ]
    base = dict(save_prep=True, save_states=False, gates=0, gate_values=False)
    runs = grads_under(monkeypatch, [{**base, **setting} for setting in settings], inp, n, cu_t, do, dS, 32)
    assert_alike(runs, inp, n, cu_t, do, dS, 10 * SAME)


@pytest.mark.parametrize("n, cu", [(1, None), (2, [0, 7, 7, 30, 50])], ids=["delta", "product-varlen"])
def test_plain_passes_form_the_scores_or_read_them_alike(rng, monkeypatch, n, cu):
    # CONFIG["scores_in_passes"]: without a gate the sequential passes form tril(Q K^T) from their
    # own tiles and prep writes no Aqk; or they read prep's. Forward, backward (with the factor or
    # W and U, kept or recomputed, with the states kept), a short last chunk and an empty sequence.
    from householder.backends import triton_delta as td

    inp, cu_t, do, dS = backward_case(rng, 1, 50, 2, 16, 16, n=n, gated=False, cu=cu)
    settings = [
        dict(scores_in_passes=False),
        dict(scores_in_passes=True),
        dict(scores_in_passes=True, save_prep=False),
        dict(scores_in_passes=True, save_states=True),
        dict(scores_in_passes=True, a_form=False),
    ]
    base = dict(save_prep=True, save_states=False, a_form=True)
    runs = grads_under(monkeypatch, [{**base, **setting} for setting in settings], inp, n, cu_t, do, dS, 32)
    assert_alike(runs, inp, n, cu_t, do, dS, 10 * SAME)
    # the setting took effect: no scores from prep without a gate, and the gated op's still there
    if n == 1:
        q, k, v, beta = (inp[key] for key in ("q", "k", "v", "beta"))
        plan = td._Plan(1, 50, 2, 16, 16, 1, 32, None, q.dtype, q.device)
        for save_x in (False, True):
            assert td.prep(q, k, v, beta, None, plan, save_x=save_x).aqk is None
        assert td.prep(q, k, v, beta, torch.zeros_like(beta), plan, save_x=True).aqk is not None
        monkeypatch.setitem(td.CONFIG, "scores_in_passes", False)
        assert td.prep(q, k, v, beta, None, plan).aqk is not None


@pytest.mark.parametrize("n, cu", [(1, None), (2, [0, 7, 7, 30, 50])], ids=["delta", "product-varlen"])
def test_gated_forward_without_backward_forms_the_scores_alike(rng, monkeypatch, n, cu):
    # CONFIG["gated_scores_in_pass"]: a gated forward that no backward follows forms
    # tril(Q K^T) o Gamma in its pass (prep writes no Aqk), or reads prep's; decays down to e^-30
    # per token, so that Gamma spans far below float32's smallest normal number inside a chunk
    from householder.backends import triton_delta as td

    N = 1 if cu is None else len(cu) - 1
    inp = make_inputs(rng, 1, 50, 2, 16, 16, n=n, gated=True, state=N)
    inp["g"] = inp["g"] * torch.linspace(0.0, 30.0, 50, device=DEVICE)[None, :, None]
    cu_t = None if cu is None else torch.tensor(cu, device=DEVICE)
    outs = []
    for setting in (False, True, "few-blocks", "auto"):  # one value block under the interpreter: in the pass
        monkeypatch.setitem(td.CONFIG, "gated_scores_in_pass", setting)
        outs.append(hh.delta_product(**inp, num_householder=n, cu_seqlens=cu_t, output_final_state=True,
                                     chunk_size=32, backend="triton"))
    ro, rS = ref_of(inp, n, cu=cu)
    for o, S in outs:
        assert rel_err(o, ro) < 1e-4 and rel_err(S, rS) < 1e-4
    for o, S in outs[1:]:
        assert rel_err(outs[0][0], o) < SAME and rel_err(outs[0][1], S) < SAME
    q, k, v, beta, g = (inp[key] for key in ("q", "k", "v", "beta", "g"))
    plan = td._Plan(1, 50, 2, 16, 16, n, 32, None, q.dtype, q.device)
    for setting in (True, "few-blocks", "auto"):
        monkeypatch.setitem(td.CONFIG, "gated_scores_in_pass", setting)
        assert td.prep(q, k, v, beta, g, plan, save_x=False).aqk is None
        assert td.prep(q, k, v, beta, g, plan, save_x=True).aqk is not None
    monkeypatch.setitem(td.CONFIG, "gated_scores_in_pass", False)
    assert td.prep(q, k, v, beta, g, plan, save_x=False).aqk is not None


@pytest.mark.parametrize(
    "setting, blocks, programs, sms, want",
    [(False, 1, 64, 132, False), (True, 4, 64, 132, True), ("few-blocks", 1, 64, 132, True), ("few-blocks", 2, 512, 132, True),
     ("few-blocks", 4, 256, 132, False), ("auto", 2, 512, 132, True), ("auto", 4, 256, 132, True),
     ("auto", 4, 128, 132, False), ("auto", 4, 256, None, False)],
)
def test_gated_scores_in_the_pass_where_few_programs_share_a_chunk(monkeypatch, setting, blocks, programs, sms, want):
    # "few-blocks": the forward's pass forms a chunk's gated scores where at most two value blocks
    # (programs) of a head would each form them; "auto" also where the pass's programs outnumber the
    # SMs (none known under the interpreter); with a backward only where the gate's gradient does
    # not read Aqk (dg_from_aqk); without a gate scores_in_passes decides
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "gated_scores_in_pass", setting)
    for from_aqk in (True, False):
        monkeypatch.setitem(td.CONFIG, "dg_from_aqk", from_aqk)
        kw = dict(value_blocks=blocks, programs=programs, sms=sms)
        assert td.scores_in_passes(0.0, backward=False, **kw) is want
        assert td.scores_in_passes(0.0, backward=True, **kw) is (want and not from_aqk)
        assert td.scores_in_passes(None, backward=True, **kw) is bool(td.CONFIG["scores_in_passes"])


@pytest.mark.parametrize("n, cu", [(1, None), (2, [0, 7, 7, 30, 50])], ids=["delta", "product-varlen"])
def test_gated_backward_forms_the_scores_or_reads_them_alike(rng, monkeypatch, n, cu):
    # With dg_from_aqk off, a gated call with a backward forms tril(Q K^T) o Gamma in the forward's
    # pass, the reverse pass and the per-chunk backward (prep writes no Aqk); with it on, prep's
    # Aqk serves all three. Fused and two-kernel backward; decays down to e^-30 per token.
    from householder.backends import triton_delta as td

    inp, cu_t, do, dS = backward_case(rng, 1, 50, 2, 16, 16, n=n, gated=True, cu=cu)
    inp["g"] = inp["g"] * torch.linspace(0.0, 30.0, 50, device=DEVICE)[None, :, None]
    settings = [dict(dg_from_aqk=True), dict(dg_from_aqk=False), dict(dg_from_aqk=False, fuse_bwd=0),
                dict(dg_from_aqk=False, save_prep=False)]
    base = dict(gated_scores_in_pass="few-blocks", fuse_bwd=2, save_prep=True)
    runs = grads_under(monkeypatch, [{**base, **setting} for setting in settings], inp, n, cu_t, do, dS, 32)
    assert_alike(runs, inp, n, cu_t, do, dS, 10 * SAME)
    q, k, v, beta, g = (inp[key] for key in ("q", "k", "v", "beta", "g"))
    plan = td._Plan(1, 50, 2, 16, 16, n, 32, None, q.dtype, q.device)
    assert td.prep(q, k, v, beta, g, plan, save_x=True).aqk is None  # dg_from_aqk off, from the last setting
    monkeypatch.setitem(td.CONFIG, "dg_from_aqk", True)
    assert td.prep(q, k, v, beta, g, plan, save_x=True).aqk is not None


@pytest.mark.parametrize("n, cu", [(1, None), (2, [0, 7, 7, 30, 50])], ids=["delta", "product-varlen"])
def test_forward_pass_writes_the_scores_for_the_backward_alike(rng, monkeypatch, n, cu):
    # CONFIG["pass_writes_scores"]: with a backward that reads Aqk, the gated forward's output pass
    # forms the scores (where it would without a backward) and its first value block's programs
    # write them in prep's place. Two value blocks (BV 16 of V = 32), so that only one writes; the
    # same Aqk as prep's and the same gradients, decays down to e^-30 per token.
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "BV", 16)
    inp, cu_t, do, dS = backward_case(rng, 1, 50, 2, 16, 32, n=n, gated=True, cu=cu)
    inp["g"] = inp["g"] * torch.linspace(0.0, 30.0, 50, device=DEVICE)[None, :, None]
    q, k, v, beta, g = (inp[key] for key in ("q", "k", "v", "beta", "g"))
    plan = td._Plan(1, 50, 2, 16, 32, n, 32, None, q.dtype, q.device)  # one sequence here; cu_seqlens below
    assert plan.seq_grid(plan.state_launch(True, want_o=True)[0])[0] == 2
    kept = {}
    for setting in (False, True):
        monkeypatch.setitem(td.CONFIG, "pass_writes_scores", setting)
        pp = td.prep(q, k, v, beta, g, plan, save_x=True, output_pass=True)
        assert pp.scores_pending is setting and pp.aqk is not None
        assert td.prep(q, k, v, beta, g, plan, save_x=True).scores_pending is False  # the backward's own prep
        o, sT, got = td._forward(q, k, v, beta, g, 0.25, None, plan, want_final=True, keep=True, dgm=td.dg_mode(g))
        assert got.prepped.scores_pending is False
        kept[setting] = (o, sT, got.prepped.aqk)
    for a, b in zip(kept[False], kept[True]):
        assert rel_err(b, a) < SAME
    assert float(kept[True][2].abs().max()) > 0
    runs = grads_under(monkeypatch, [dict(pass_writes_scores=s) for s in (False, True)], inp, n, cu_t, do, dS, 32)
    assert_alike(runs, inp, n, cu_t, do, dS, 10 * SAME)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("n, cu", [(1, None), (2, [0, 7, 7, 30, 50])], ids=["delta", "product-varlen"])
def test_scores_kernel_writes_the_scores_alike(rng, monkeypatch, gated, n, cu):
    # CONFIG["scores_kernel"]: where the passes read Aqk, a kernel of its own writes it and prep
    # none (prep then at its no-scores launch setting); the same Aqk as prep's, the same outputs
    # and gradients. K = 64, two key blocks; decays down to e^-30 per token.
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "gated_scores_in_pass", False)
    monkeypatch.setitem(td.CONFIG, "scores_in_passes", False)
    inp, cu_t, do, dS = backward_case(rng, 1, 50, 2, 64, 16, n=n, gated=gated, cu=cu)
    if gated:
        inp["g"] = inp["g"] * torch.linspace(0.0, 30.0, 50, device=DEVICE)[None, :, None]
    q, k, v, beta, g = (inp.get(key) for key in ("q", "k", "v", "beta", "g"))
    plan = td._Plan(1, 50, 2, 64, 16, n, 32, None, q.dtype, q.device)
    launched = []
    real = td.launch
    monkeypatch.setattr(td, "launch", lambda name, *a, **kw: (launched.append(name), real(name, *a, **kw)))
    preps = []
    for setting in (False, True):
        monkeypatch.setitem(td.CONFIG, "scores_kernel", setting)
        launched.clear()
        preps.append(td.prep(q, k, v, beta, g, plan, save_x=True, output_pass=True))
        assert launched == (["prep_no_scores", "scores"] if setting else ["prep"])
    assert preps[0].aqk is not None and float(preps[0].aqk.abs().max()) > 0
    for name in ("aqk", "a", "xs"):
        assert rel_err(getattr(preps[1], name), getattr(preps[0], name)) < SAME, name
    monkeypatch.setattr(td, "launch", real)
    runs = grads_under(monkeypatch, [dict(scores_kernel=s) for s in (False, True)], inp, n, cu_t, do, dS, 32)
    assert_alike(runs, inp, n, cu_t, do, dS, 10 * SAME)


def test_scores_writer_names_one_writer_of_aqk(monkeypatch):
    # scores_writer: nothing where the passes form the scores, else the output pass
    # (pass_writes_scores, with a backward and the output pass next), scores_kernel or prep
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "gated_scores_in_pass", "auto")
    monkeypatch.setitem(td.CONFIG, "pass_writes_scores", True)
    monkeypatch.setitem(td.CONFIG, "scores_kernel", False)
    kw = dict(value_blocks=2, programs=512, sms=132)
    assert td.scores_writer(0.0, False, True, **kw) is None
    assert td.scores_writer(0.0, True, True, **kw) == "pass"
    assert td.scores_writer(0.0, True, False, **kw) == "prep"
    assert td.scores_writer(0.0, True, True, value_blocks=4, programs=128, sms=132) == "prep"
    monkeypatch.setitem(td.CONFIG, "scores_kernel", True)
    assert td.scores_writer(0.0, True, True, value_blocks=4, programs=128, sms=132) == "scores_kernel"
    assert td.scores_writer(None, True, True, **kw) is None  # scores_in_passes, plain


def test_pass_writes_scores_only_where_it_forms_them(monkeypatch):
    # the output pass writes Aqk only with a gate, under the setting, and where gated_scores_in_pass
    # has a forward without a backward form the scores in its pass
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "gated_scores_in_pass", "auto")
    monkeypatch.setitem(td.CONFIG, "pass_writes_scores", True)
    assert td.pass_writes_scores(0.0, 2, 512, 132) is True
    assert td.pass_writes_scores(0.0, 4, 256, 132) is True
    assert td.pass_writes_scores(0.0, 4, 128, 132) is False
    assert td.pass_writes_scores(None, 1, 64, 132) is False
    monkeypatch.setitem(td.CONFIG, "gated_scores_in_pass", False)
    assert td.pass_writes_scores(0.0, 1, 512, 132) is False
    monkeypatch.setitem(td.CONFIG, "gated_scores_in_pass", "auto")
    monkeypatch.setitem(td.CONFIG, "pass_writes_scores", False)
    assert td.pass_writes_scores(0.0, 1, 512, 132) is False


@pytest.mark.parametrize("bad", ["few", 1, None])
def test_gated_scores_setting_refuses_unknown_values(monkeypatch, bad):
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "gated_scores_in_pass", bad)
    with pytest.raises(ValueError, match="gated_scores_in_pass"):
        td.scores_in_passes(0.0, backward=False)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_chunk_inverses_kept_in_half_precision(rng, monkeypatch, gated):
    # CONFIG["x_half"]: the forward keeps X in the inputs' precision for the backward. bf16 inputs at
    # chunk 64 (all of X's quadrants), a short last chunk; both settings within a bf16-sized
    # tolerance of the float64 torch path, and X really kept in bf16 (a misread half tile is off by O(1))
    from householder.backends import triton_delta as td

    B, T, H, K = 1, 100, 2, 64
    inp = make_inputs(rng, B, T, H, K, K, gated=gated, state=B, dtype=torch.bfloat16)
    inp["k"] = torch.nn.functional.normalize(inp["k"].float(), dim=-1).to(torch.bfloat16)
    do = torch.tensor(rng.standard_normal((B, T, H, K)), dtype=torch.float32, device=DEVICE)
    dS = torch.tensor(rng.standard_normal((B, H, K, K)), dtype=torch.float32, device=DEVICE)
    want = _grads({k: x.double() for k, x in inp.items()}, "torch", 1, None, do.double(), dS.double(), 64)
    q, k, v, beta = (inp[key] for key in ("q", "k", "v", "beta"))
    plan = td._Plan(B, T, H, K, K, 1, 64, None, q.dtype, q.device)
    for half in (False, True):
        monkeypatch.setitem(td.CONFIG, "x_half", half)
        xs = td.prep(q, k, v, beta, inp.get("g"), plan, save_x=True).xs
        assert xs.dtype == (torch.bfloat16 if half else torch.float32)
        got = _grads(inp, "triton", 1, None, do.to(torch.bfloat16), dS, 64)
        for name, a, b in zip(["o", "S"] + [f"d{m}" for m in inp], got, want):
            assert rel_err(a, b) < 3e-2, (half, name)


@pytest.mark.parametrize("a_form", [False, True], ids=["w-u", "a-form"])
@pytest.mark.parametrize("states", [False, True])
@pytest.mark.parametrize("fuse", [1, 2], ids=["two-kernels", "fused"])
def test_kept_chunk_quantities_are_released_by_the_backward(rng, monkeypatch, fuse, states, a_form):
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "save_prep", True)
    monkeypatch.setitem(td.CONFIG, "save_states", states)
    monkeypatch.setitem(td.CONFIG, "a_form", a_form)
    monkeypatch.setitem(td.CONFIG, "fuse_bwd", fuse)  # gated: the two per-chunk kernels (1) or one
    monkeypatch.setitem(td.CONFIG, "gates", 1)  # so that prep writes the running log-decays G too
    inp = {k: x.requires_grad_() for k, x in make_inputs(rng, 1, 40, 1, 16, 16, gated=True, state=1).items()}
    o, _ = hh.delta_rule(**inp, chunk_size=16, backend="triton")
    node = o.grad_fn
    assert isinstance(node.prepped, td.Kept)
    pp = node.prepped.prepped
    assert pp.gcs is not None and (node.prepped.h is not None) == states
    assert (pp.a is not None, pp.w is None, pp.u is None) == (a_form,) * 3
    kept = {"W or A": weakref.ref(pp.a if a_form else pp.w), "G": weakref.ref(pp.gcs)}
    if not a_form:
        kept["U"] = weakref.ref(pp.u)
    if states and fuse == 1:  # the fused kernel reads h itself
        kept["h"] = weakref.ref(node.prepped.h)
    del pp
    alive = {}
    last = "bwd_wy" if fuse == 1 else "bwd_fused_gated"

    def spy(name, *args, **meta):  # the last readers of W (or A), U, G (and h) run before ``last``
        if name == last:
            alive.update({key: ref() is not None for key, ref in kept.items()})
        return launch(name, *args, **meta)

    launch = td.launch
    monkeypatch.setattr(td, "launch", spy)
    o.sum().backward()
    assert node.prepped is None
    assert alive == {key: False for key in kept}  # empty (a failing test) if ``last`` never ran


@pytest.mark.parametrize("K", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    "gated, fuse, split, a_form, form",
    [
        pytest.param(gated, *setting, id=f"{'gated' if gated else 'plain'}-{name}")
        for gated in (True, False)
        for name, setting in (("two-kernels", (0, 1, False, "decays")), ("two-kernels-split", (0, 2, False, "decays")),
                              ("fused", (2, 1, False, "decays")), ("two-kernels-a-form", (0, 1, True, "decays")),
                              ("fused-a-form", (2, 1, True, "decays")), ("fused-dg-chunk", (2, 1, True, "chunk")),
                              ("two-kernels-dg-chunk", (0, 1, True, "chunk")))
        if gated or "dg-" not in name  # dg_form changes only the gated op's backward
    ],
)
def test_chunk64_backward_at_model_head_sizes(rng, monkeypatch, K, dtype, gated, fuse, split, a_form, form):
    # The shapes of the benchmarks (chunk 64, K = V in {64, 128, 256}, a short last chunk) in
    # bf16 too, through either per-chunk backward (CONFIG["fuse_bwd"]): the kernels' tile sizes
    # there differ from the tiny shapes above, and a former single backward kernel misread shared
    # memory at these shapes on a GPU. Half inputs are compared with a bf16-sized tolerance
    # against the float64 torch path.
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "fuse_bwd", fuse)
    monkeypatch.setitem(td.CONFIG, "bwd_dqk_split", split)
    monkeypatch.setitem(td.CONFIG, "a_form", a_form)
    monkeypatch.setitem(td.CONFIG, "dg_form", form)
    B, T, H = 1, 100, 2
    inp = make_inputs(rng, B, T, H, K, K, gated=gated, state=B, dtype=dtype)
    inp["k"] = torch.nn.functional.normalize(inp["k"].float(), dim=-1).to(dtype)
    do = torch.tensor(rng.standard_normal((B, T, H, K)), dtype=torch.float32, device=DEVICE)
    dS = torch.tensor(rng.standard_normal((B, H, K, K)), dtype=torch.float32, device=DEVICE)
    got = _grads(inp, "triton", 1, None, do.to(dtype), dS, 64)
    want = _grads({k: x.double() for k, x in inp.items()}, "torch", 1, None, do.double(), dS.double(), 64)
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    for name, a, b in zip(["o", "S"] + [f"d{n}" for n in inp], got, want):
        # dg's chunk form sums terms that largely cancel (the end state's against the rows' v . dv):
        # in bf16 over 12 seeds at K = 128 its error reached 2.7e-2 (median 8e-3), the decays
        # form's 1.2e-2; a misread tile is off by O(1)
        wide = name == "dg" and form == "chunk" and dtype != torch.float32
        assert rel_err(a, b) < (2 * tol if wide else tol), name


def test_second_backward_with_retain_graph_recomputes_what_the_first_released(rng, monkeypatch):
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "save_prep", True)
    inp = {k: x.requires_grad_() for k, x in make_inputs(rng, 1, 40, 1, 16, 16, state=1).items()}
    o, _ = hh.delta_rule(**inp, chunk_size=16, backend="triton")
    first = torch.autograd.grad(o.sum(), list(inp.values()), retain_graph=True)
    second = torch.autograd.grad(o.sum(), list(inp.values()))
    for name, a, b in zip(inp, first, second):
        assert rel_err(a, b) < 1e-6, name


@pytest.mark.parametrize(
    "B, T, H, K, V, n, chunk, gated, cu",
    [
        (2, 37, 2, 8, 24, 1, 16, True, None),  # short last chunk, K != V, K below the 16-wide tiles
        (1, 40, 1, 16, 16, 1, 32, False, None),
        (1, 70, 2, 16, 16, 1, 64, True, None),  # chunk 64 with 16-wide key and value blocks
        (1, 50, 2, 80, 72, 2, 16, True, [0, 23, 23, 50]),  # two key and value blocks (partial), DeltaProduct, varlen with an empty sequence
    ],
)
def test_fused_backward_matches_the_two_kernel_one(rng, monkeypatch, B, T, H, K, V, n, chunk, gated, cu):
    # CONFIG["fuse_bwd"]: the per-chunk backward in one kernel or two; same products on the same
    # chunks, so the gradients agree to float32 rounding, and both with the float64 torch path
    from householder.backends import triton_delta as td

    inp, cu_t, do, dS = backward_case(rng, B, T, H, K, V, n=n, gated=gated, cu=cu)
    runs = []
    # (fuse_bwd, dg_from_aqk, bwd_unroll and fused_unroll, bwd_dqk_split, dg_form): mode 1 fuses
    # unless the gate's gradient takes the decays form, 2 always; the gate's score term from the
    # forward's Aqk or from Q K^T formed again; the block loops rolled or unrolled by 2 -- in either
    # kernel; bwd_dqk's key columns in one program or split (two programs at K = 80: a full 64-wide
    # block and a partial one); the gate's gradient in each form (both kernels). Mode 1 comes last.
    settings = ((0, False, 2, 1, "decays"), (2, False, 2, 1, "decays"), (2, True, 1, 1, "decays"),
                (0, True, 1, 2, "decays"), (0, True, 2, 4, "decays"), (0, True, 1, 2, "chunk"),
                (2, False, 2, 1, "chunk"), (0, False, 1, 1, "chunk"), (1, True, 1, 1, "chunk"),
                (1, False, 2, 2, "decays"))
    for fused, aqk, unroll, split, form in settings:
        monkeypatch.setitem(td.CONFIG, "dg_form", form)
        monkeypatch.setitem(td.CONFIG, "fuse_bwd", fused)
        monkeypatch.setitem(td.CONFIG, "dg_from_aqk", aqk)
        monkeypatch.setitem(td.CONFIG, "bwd_unroll", unroll)
        monkeypatch.setitem(td.CONFIG, "fused_unroll", unroll)
        monkeypatch.setitem(td.CONFIG, "bwd_dqk_split", split)
        runs.append(_grads(inp, "triton", n, cu_t, do, dS, chunk))
    want = _grads({k: x.double() for k, x in inp.items()}, "torch", n, cu_t, do.double(), dS.double(), 64)
    names = ["o", "S"] + [f"d{m}" for m in inp]
    for i, (setting, run) in enumerate(zip(settings, runs)):
        # dg by the forms is summed differently: each agrees with the first run of its own form
        first = next(r for s_, r in zip(settings, runs) if s_[4] == setting[4])
        for name, b, a, c in zip(names, run, first, want):
            # dg is a running sum of terms that largely cancel, added in each kernel's own order
            assert rel_err(b, a) < (10 * SAME if name == "dg" else SAME), (name, setting)
            assert rel_err(b, c) < 2e-4, (name, setting)
    # mode 1, the last one above: the plain op fused, the gated one only under the chunk form
    assert td.fused_backward(td.dg_mode(None)) and not td.fused_backward(td.DG_MODES["decays"])
    assert td.fused_backward(td.DG_MODES["chunk"])


def test_unknown_gate_gradient_form_is_refused(rng, monkeypatch):
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "dg_form", "rescaled")
    inp = {k: x.requires_grad_() for k, x in make_inputs(rng, 1, 20, 1, 16, 16).items()}
    with pytest.raises(ValueError, match=r"dg_form.*'chunk'.*got 'rescaled'"):
        hh.delta_rule(**inp, chunk_size=16, backend="triton")


@pytest.mark.parametrize("splits", [0, 1, 2])
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_chunk_factor_inverse_split_into_quadrants(rng, monkeypatch, splits, chunk):
    # CONFIG["inverse_splits"]: the prep kernel's triangular inverse by doubling over the whole
    # chunk (0) or through quadrants split once or twice (fewer when the chunk is too small);
    # nearly parallel keys make the inverse's entries large, where a wrong merge would show
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "inverse_splits", splits)
    inp = make_inputs(rng, 1, 70, 2, 16, 16, n=1, state=1)
    base = inp["k"][:, :1]
    inp["k"] = torch.nn.functional.normalize(base + 0.05 * inp["k"], dim=-1)
    inp["beta"] = torch.full_like(inp["beta"], 1.9)
    o, S = hh.delta_rule(**inp, output_final_state=True, chunk_size=chunk, backend="triton")
    ro, rS = ref_of(inp)
    assert rel_err(o, ro) < 1e-4
    assert rel_err(S, rS) < 1e-4
    got = _grads(inp, "triton", 1, None, torch.ones_like(o), torch.ones_like(S), chunk)
    want = _grads({k: x.double() for k, x in inp.items()}, "torch", 1, None, torch.ones_like(o).double(), torch.ones_like(S).double(), 64)
    for name, a, b in zip(["o", "S"] + [f"d{m}" for m in inp], got, want):
        assert rel_err(a, b) < 2e-4, name


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "plain"])
def test_sequential_passes_split_the_values_into_blocks_alike(rng, monkeypatch, gated):
    # CONFIG["BV"] / ["bwd_state_BV"]: the value columns of each program of the state pass and of
    # the reverse pass (None: chosen per call; all of them in the interpreter). V = 80 leaves a
    # partial last block at 32 and 64 columns.
    from householder.backends import triton_delta as td

    inp = make_inputs(rng, 2, 70, 2, 32, 80, gated=gated, state=2)
    do = torch.tensor(rng.standard_normal((2, 70, 2, 80)), dtype=torch.float32, device=DEVICE)
    dS = torch.tensor(rng.standard_normal((2, 2, 32, 80)), dtype=torch.float32, device=DEVICE)
    runs = []
    for bv in (None, 32, 64, 16):
        monkeypatch.setitem(td.CONFIG, "BV", bv)
        monkeypatch.setitem(td.CONFIG, "bwd_state_BV", 64 if bv == 16 else bv)  # one run with the two apart
        runs.append(_grads(inp, "triton", 1, None, do, dS, 64))
    want = _grads({k: x.double() for k, x in inp.items()}, "torch", 1, None, do.double(), dS.double(), 64)
    for name, a, *others, c in zip(["o", "S"] + [f"d{m}" for m in inp], *runs, want):
        for b in others:
            assert rel_err(b, a) < SAME, name
        assert rel_err(a, c) < 2e-4, name


@pytest.mark.parametrize(
    "B, T, gated, beside, own_scores, want",
    # on 132 SMs, H = 16, K = V = 128: 64 value columns once N x H x 2 programs reach 3/4 of the SMs,
    # or, gated, 1.5 times them when the reverse pass runs beside the forward's pass run again; the
    # plain pass that forms its own scores (scores_in_passes) 32 at every shape
    [(16, 2048, True, False, True, 64), (16, 2048, True, True, True, 64), (8, 4096, True, True, True, 64),
     (4, 8192, True, False, True, 64), (4, 8192, True, True, True, 32), (4, 8192, False, True, False, 64),
     (2, 16384, True, False, True, 32), (2, 16384, True, True, True, 32), (2, 16384, False, True, False, 32),
     (16, 2048, False, False, True, 32), (16, 2048, False, True, True, 32), (4, 8192, False, True, True, 32),
     (16, 2048, False, False, False, 64)],
)
def test_reverse_pass_takes_narrower_blocks_beside_the_other_pass(monkeypatch, B, T, gated, beside, own_scores, want):
    from householder.backends import triton_delta as td

    monkeypatch.setitem(td.CONFIG, "bwd_state_BV", None)
    monkeypatch.setitem(td.CONFIG, "a_form", True)
    monkeypatch.setitem(td.CONFIG, "scores_in_passes", own_scores)
    plan = td._Plan(B, T, 16, 128, 128, 1, 64, None, torch.bfloat16, torch.device("cpu"))
    assert plan.reverse_launch(gated, sms=132, beside=beside)[0] == want
    monkeypatch.setitem(td.CONFIG, "bwd_state_BV", 16)
    assert plan.reverse_launch(gated, sms=132, beside=beside)[0] == 16  # a setting is taken as it is


@pytest.mark.parametrize(
    "K, setting, want",
    [(128, 1, (1, 128)), (128, 2, (2, 64)), (128, 8, (2, 64)), (256, 2, (2, 128)), (192, 2, (2, 128)), (64, 4, (1, 64)), (16, 2, (1, 16))],
)
def test_key_splits_take_whole_blocks(K, setting, want):
    # CONFIG["bwd_dqk_split"]: each split of bwd_dqk's grid takes whole 64-wide key blocks (the
    # last possibly partial), never more splits than blocks
    from householder.backends import triton_delta as td

    plan = td._Plan(1, 64, 1, K, K, 1, 64, None, torch.float32, torch.device("cpu"))
    assert plan.key_splits(setting) == want
    for bad in (0, -1, 1.5, None):
        with pytest.raises(ValueError, match="bwd_dqk_split"):
            plan.key_splits(bad)
