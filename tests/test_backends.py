"""Every backend against the reference backend, through the kernel contract.

Tolerances: the moments are bit-identical (the fused kernels perform the reference's
operations in the same order, without FMA contraction).  The float64 sums of squares
may differ in the last bits (another summation order: <= 1e-12 relative), so the step
sizes and the weights can too: float64 weights within 1e-13, float32 within 2**-22,
half-precision outputs within one ULP (1e-2 relative) — and bit-identical whenever the
norms came out bit-identical, which is the usual case for float32.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mplamb._scalars import phase1_scalars
from mplamb.kernels import LambBatch, available_backends, get_backend, plan_phase1

OTHER = [b for b in available_backends("cpu") if b != "reference"]
SHAPES = [(0,), (), (1,), (7,), (33, 17), (20000,), (3, 1, 5), (8193,)]


def build(seed, weight_dtype, master, shapes, *, layout="contiguous", out_mode="inplace", hp=None, steps=None):
    g = torch.Generator().manual_seed(seed)
    hp = hp or {}
    cdtype = torch.float64 if weight_dtype == torch.float64 else torch.float32
    state_dtype = cdtype
    ws, gs, ms, vs, masters, outs, scalars = [], [], [], [], [], [], []
    for k, s in enumerate(shapes):
        def rnd(dt, positive=False, scale=1.0):
            x = torch.randn((*s[:-1], 2 * s[-1]) if layout == "strided" and len(s) >= 1 and s[-1] > 0 else s,
                            generator=g, dtype=torch.float64)
            x = (x.abs() if positive else x) * scale
            if layout == "strided" and len(s) >= 1 and s[-1] > 0:
                x = x[..., ::2]  # every other element: a non-contiguous view
            out = torch.empty_strided(x.shape, x.stride(), dtype=dt)
            out.copy_(x)
            return out
        w32 = rnd(torch.float32 if master else weight_dtype)
        w = w32.to(weight_dtype) if master else w32
        ws.append(w)
        gs.append(rnd(weight_dtype, scale=3.0))
        ms.append(rnd(state_dtype, scale=0.1))
        vs.append(rnd(state_dtype, positive=True, scale=0.1))
        masters.append(w32 if master else None)
        outs.append(w if (master or out_mode == "inplace") else torch.zeros_like(w))
        t = 1 + 7 * k if steps is None else steps[k % len(steps)]
        scalars.append(phase1_scalars(t=t, wd=hp.get("wd", 0.01), beta1=hp.get("beta1", 0.9),
                                      beta2=hp.get("beta2", 0.999), epsilon=hp.get("epsilon", 1e-6),
                                      bias_correction=hp.get("bias_correction", True),
                                      rescale_grad=hp.get("rescale_grad", 1.0),
                                      clip_gradient=hp.get("clip_gradient", -1.0), dtype=cdtype,
                                      grad_averaging=hp.get("grad_averaging", True)))
    rescale = hp.get("rescale_tensor")
    return LambBatch(weights=ws, grads=gs, means=ms, vars=vs, masters=masters, outs=outs, scalars=scalars,
                     lrs=[0.01 * (k + 1) for k in range(len(shapes))],
                     adapt=hp.get("adapt"), lower_bound=hp.get("lower_bound"), upper_bound=hp.get("upper_bound"),
                     max_trust_ratio=hp.get("max_trust_ratio"),
                     rescale=None if rescale is None else torch.tensor(rescale, dtype=cdtype))


def tensors(batch):
    """(tensor, is_moment) for every tensor a step may write."""
    out = []
    for i in range(len(batch.weights)):
        out += [(batch.weights[i], False), (batch.means[i], True), (batch.vars[i], True), (batch.outs[i], False)]
        if batch.masters[i] is not None:
            out.append((batch.masters[i], False))
    return out


RTOL = {torch.float64: 1e-13, torch.float32: 2.0**-22, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def assert_same(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), what
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    assert bool(same.all()), f"{what}: {int((~same).sum())} elements differ"


def run_both(backend, dry=False, **kw):
    """One step of ``backend`` (``dry``: through the dry phase 1) against the reference's plain step."""
    ref_batch, fast_batch = build(**kw), build(**kw)
    ref = get_backend("reference").lamb_step(ref_batch)
    fast = get_backend(backend).lamb_step(fast_batch, dry=dry)
    exact_norms = torch.equal(fast.step_sizes, ref.step_sizes)
    for k, ((a, moment), (b, _)) in enumerate(zip(tensors(ref_batch), tensors(fast_batch))):
        if moment or exact_norms:
            assert_same(b, a, f"tensor {k}")
        else:
            scale = float(a.double().abs().max()) if a.numel() else 0.0  # cancellation near zero: absolute
            torch.testing.assert_close(b, a, rtol=RTOL[a.dtype], atol=RTOL[a.dtype] * scale, equal_nan=True)
    torch.testing.assert_close(fast.sumsq, ref.sumsq, rtol=1e-12, atol=0)
    torch.testing.assert_close(fast.step_sizes, ref.step_sizes, rtol=1e-6, atol=0, equal_nan=True)
    return ref, fast


DTYPE_MODES = [(torch.float32, False), (torch.float64, False), (torch.bfloat16, True), (torch.float16, True),
               (torch.bfloat16, False)]


@pytest.mark.parametrize("backend", OTHER)
@pytest.mark.parametrize("dtype,master", DTYPE_MODES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_backend_matches_reference_on_mixed_shapes(backend, dtype, master, layout):
    if layout == "strided":
        b = build(seed=0, weight_dtype=dtype, master=master, shapes=SHAPES, layout=layout)
        assert not all(t.is_contiguous() for t, _ in tensors(b))  # the layout really is non-contiguous
    run_both(backend, seed=0, weight_dtype=dtype, master=master, shapes=SHAPES, layout=layout)


@pytest.mark.parametrize("backend", OTHER)
def test_backend_out_not_in_place(backend):
    ref_batch = build(seed=3, weight_dtype=torch.float32, master=False, shapes=SHAPES, out_mode="new")
    before = [w.clone() for w in ref_batch.weights]
    get_backend(backend).lamb_step(ref_batch)
    for w, b in zip(ref_batch.weights, before):
        assert torch.equal(w, b)  # only out is written
    run_both(backend, seed=3, weight_dtype=torch.float32, master=False, shapes=SHAPES, out_mode="new")


HP = st.fixed_dictionaries({
    "wd": st.sampled_from([0.0, 0.1]),
    "beta1": st.sampled_from([0.0, 0.9]),
    "beta2": st.sampled_from([0.0, 0.999]),
    "epsilon": st.sampled_from([0.0, 1e-6]),
    "bias_correction": st.booleans(),
    "rescale_grad": st.sampled_from([1.0, 2.0**-7]),
    "clip_gradient": st.sampled_from([-1.0, 0.5]),
    "grad_averaging": st.booleans(),
    "lower_bound": st.sampled_from([None, 0.5]),
    "upper_bound": st.sampled_from([None, 2.0]),
    "max_trust_ratio": st.sampled_from([None, 0.7]),
    "rescale_tensor": st.sampled_from([None, 0.25]),
    "adapt": st.sampled_from([None, [False, True, True]]),
})


@pytest.mark.parametrize("backend", OTHER)
@pytest.mark.parametrize("dtype,master", DTYPE_MODES[:4])
@given(hp=HP, seed=st.integers(0, 1000), dry=st.booleans())
@settings(max_examples=8, deadline=None)
def test_backend_matches_reference_hyper_parameters(backend, dtype, master, hp, seed, dry):
    run_both(backend, dry=dry, seed=seed, weight_dtype=dtype, master=master, shapes=[(5,), (300,), (1,)], hp=hp)


# Step counts around the points where the bias divisors round to exactly 1 (float64 1 - 0.9**t from
# t = 356, float32 1 - 0.999**t from t = 17,321) and the fused kernels stop dividing; mixed counts
# in one batch make the kernels divide rows whose divisor is already 1.
LATE_STEPS = [[355], [356], [17320], [17321, 10**6], [1, 400], [400, 10**6]]


@pytest.mark.parametrize("backend", OTHER)
@pytest.mark.parametrize("dtype,master", [DTYPE_MODES[i] for i in (0, 1, 2, 4)])
@pytest.mark.parametrize("steps", LATE_STEPS, ids=str)
@pytest.mark.parametrize("dry", [False, True])
def test_backend_matches_reference_at_late_steps(backend, dtype, master, steps, dry):
    run_both(backend, dry=dry, seed=5, weight_dtype=dtype, master=master, shapes=SHAPES, steps=steps)


@pytest.mark.parametrize("backend", OTHER)
@pytest.mark.parametrize("betas", [(0.999, 0.9), (0.5, 0.5), (0.0, 0.0)], ids=str)
@pytest.mark.parametrize("steps", [[1], [60], [400], [1, 60, 400]], ids=str)
def test_backend_matches_reference_at_late_steps_other_betas(backend, betas, steps):
    """beta2 < beta1: the var divisor reaches 1 first (the kernels keep dividing both)."""
    hp = {"beta1": betas[0], "beta2": betas[1]}
    run_both(backend, seed=6, weight_dtype=torch.float32, master=False, shapes=SHAPES, steps=steps, hp=hp)


def test_bias_regimes_are_chosen_from_exact_ones():
    fused_cpu = pytest.importorskip("mplamb.kernels.fused_cpu")
    if not fused_cpu.AVAILABLE:
        pytest.skip("numba is not installed")
    import numpy as np
    K = fused_cpu.K

    def regime(rows):
        return type(fused_cpu.bias_regime(np.asarray(rows, dtype=np.float64))[1])

    one = (1.0, 1.0, 1.0, 1.0)
    assert regime([one]) is type(K.BIAS_NONE)
    assert regime([(0.0, 0.0, 0.0, 0.0)]) is type(K.BIAS_NONE)  # no bias correction
    assert regime([(1.0, 0.5, 1.0, 2.0)]) is type(K.BIAS_VAR)
    assert regime([one, (1.0, 0.5, 1.0, 2.0)]) is type(K.BIAS_VAR)
    assert regime([(1.0 - 2.0**-53, 1.0, 1.0, 1.0)]) is type(K.BIAS_BOTH)  # not exactly 1: divides
    assert regime([(0.5, 1.0, 2.0, 1.0)]) is type(K.BIAS_BOTH)
    rows, _ = fused_cpu.bias_regime(np.zeros((2, 4)))
    assert (rows == 1.0).all()  # off rows divide by exactly 1 if a loop divides at all
    # the documented thresholds at MXNet's betas
    for t, expected in [(355, K.BIAS_BOTH), (356, K.BIAS_VAR), (17320, K.BIAS_VAR), (17321, K.BIAS_NONE)]:
        sc = phase1_scalars(t=t, wd=0.0, beta1=0.9, beta2=0.999, epsilon=1e-6, bias_correction=True,
                            rescale_grad=1.0, clip_gradient=-1.0, dtype=torch.float32)
        assert regime([(sc.bias1, sc.bias2, 1 / sc.bias1, 1 / sc.bias2)]) is type(expected), t


def test_warm_up_compiles_every_bias_loop():
    fused_cpu = pytest.importorskip("mplamb.kernels.fused_cpu")
    if not fused_cpu.AVAILABLE:
        pytest.skip("numba is not installed")
    fused_cpu.warm_up(dtypes=(torch.float32, torch.bfloat16))
    for kernel in (fused_cpu.K.phase1_pass, fused_cpu.K.phase2_inplace_pass, fused_cpu.K.phase2_master_pass):
        assert {str(sig[-1]) for sig in kernel.signatures} >= {"float64", "float32", "int8"}, kernel


ALL = ["reference"] + OTHER


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype,master", DTYPE_MODES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_dry_step_matches_the_plain_step(backend, dtype, master, layout):
    """Moments written in phase 2 instead of phase 1: the same step, bit for bit."""
    run_both(backend, dry=True, seed=2, weight_dtype=dtype, master=master, shapes=SHAPES, layout=layout)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, True), (torch.float64, False),
                                          (torch.float16, False)])
def test_dry_phase1_writes_nothing_and_adds_gradient_norms(backend, dtype, master):
    impl = get_backend(backend)
    batch = build(seed=4, weight_dtype=dtype, master=master, shapes=SHAPES, layout="strided")
    before = [t.clone() for t, _ in tensors(batch)]
    p1 = impl.phase1_batch(batch, dry=True)
    for k, ((t, _), b) in enumerate(zip(tensors(batch), before)):
        assert torch.equal(t, b), f"tensor {k} written by a dry phase 1"  # (no NaN in this batch)
    assert p1.dry and p1.sumsq.shape == (3, len(SHAPES))
    plain = impl.phase1_batch(build(seed=4, weight_dtype=dtype, master=master, shapes=SHAPES, layout="strided"))
    assert plain.sumsq.shape == (2, len(SHAPES))
    torch.testing.assert_close(p1.sumsq[:2], plain.sumsq, rtol=0, atol=0)
    torch.testing.assert_close(p1.sumsq[2], get_backend("reference").grad_sum_of_squares(batch.grads),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", OTHER)
def test_backend_non_finite_values(backend):
    """NaN/inf gradients flow through exactly as in the reference (the operators do not skip)."""
    def build_bad(**kw):
        b = build(**kw)
        b.grads[1].view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
        return b

    for dtype, master in [(torch.float32, False), (torch.bfloat16, True)]:
        ref_b = build_bad(seed=1, weight_dtype=dtype, master=master, shapes=[(5,), (9,)])
        fast_b = build_bad(seed=1, weight_dtype=dtype, master=master, shapes=[(5,), (9,)])
        get_backend("reference").lamb_step(ref_b)
        get_backend(backend).lamb_step(fast_b)
        for (a, _), (b, _) in zip(tensors(ref_b), tensors(fast_b)):
            assert_same(b, a, "non-finite")


@pytest.mark.parametrize("backend", OTHER)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_grad_sum_of_squares(backend, dtype):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g).to(dtype) for s in [(0,), (), (5,), (20001,)]]
    grads.append(torch.randn(40, 30, generator=g).to(dtype).t())  # non-contiguous
    ref = get_backend("reference").grad_sum_of_squares(grads)
    got = get_backend(backend).grad_sum_of_squares(grads)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", OTHER)
def test_backend_is_deterministic(backend):
    runs = []
    for _ in range(2):
        b = build(seed=5, weight_dtype=torch.bfloat16, master=True, shapes=[(100_000,), (3, 7)])
        get_backend(backend).lamb_step(b)
        runs.append([t for t, _ in tensors(b)])
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("same_list", [True, False])
def test_gradient_pass_memo_is_used_only_by_the_same_gradient_list(backend, same_list):
    """grad_sum_of_squares(grads, memo) may leave the gradients' addresses for phase 1; phase 1 may
    take them only for the very same list object (this step's), never for other gradients."""
    impl = get_backend(backend)
    kw = dict(weight_dtype=torch.bfloat16, master=True, shapes=SHAPES)
    batch, other = build(seed=8, **kw), build(seed=9, **kw)
    memo = {}
    impl.grad_sum_of_squares(batch.grads if same_list else other.grads, memo=memo)
    batch.memo = memo
    got = impl.lamb_step(batch)
    ref_batch = build(seed=8, **kw)
    ref = get_backend("reference").lamb_step(ref_batch)
    torch.testing.assert_close(got.sumsq, ref.sumsq, rtol=1e-12, atol=0)
    for (a, _), (b, _) in zip(tensors(ref_batch), tensors(batch)):
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-6, equal_nan=True)
    assert "grad_addresses" not in memo  # consumed (or never left) by phase 1


def merged(*batches):
    """One non-uniform batch of several batches' tensors (several dtype partitions: one launch each)."""
    fields = ("weights", "grads", "means", "vars", "masters", "outs", "scalars")
    lists = {f: [x for b in batches for x in getattr(b, f)] for f in fields}
    return LambBatch(**lists, lrs=[lr for b in batches for lr in b.lrs])


MIXED = [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True), (torch.float64, False),
         (torch.bfloat16, False)]


@pytest.mark.parametrize("backend", OTHER)
@pytest.mark.parametrize("dry", [False, True])
def test_backend_mixed_dtype_partitions(backend, dry):
    """Tensors of several dtype combinations in one batch, interleaved: every partition gets its own
    launch and its norms land in the right columns."""
    def build_mixed():
        parts = [build(seed=20 + k, weight_dtype=dt, master=ms, shapes=[(33,), (0,), (5, 3), (2500,)][k % 2:])
                 for k, (dt, ms) in enumerate(MIXED)]
        b = merged(*parts)
        order = [j for k in range(4) for j in range(k, len(b.weights), 4)]  # interleave the partitions
        return LambBatch(**{f: [getattr(b, f)[j] for j in order] for f in
                            ("weights", "grads", "means", "vars", "masters", "outs", "scalars")},
                         lrs=[b.lrs[j] for j in order])

    ref_batch, fast_batch = build_mixed(), build_mixed()
    ref = get_backend("reference").lamb_step(ref_batch)
    fast = get_backend(backend).lamb_step(fast_batch, dry=dry)
    torch.testing.assert_close(fast.sumsq, ref.sumsq, rtol=1e-12, atol=0)
    torch.testing.assert_close(fast.step_sizes, ref.step_sizes, rtol=1e-6, atol=0)
    for k, ((a, _), (b, _)) in enumerate(zip(tensors(ref_batch), tensors(fast_batch))):
        torch.testing.assert_close(b, a, rtol=RTOL[a.dtype], atol=1e-7, msg=f"tensor {k}")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dry", [False, True])
def test_planned_phase1_writes_nothing_until_launched(backend, dry):
    """``plan_phase1``: the preparation (the optimizer's, before its skip decision) writes nothing,
    strided tensors and a float64 partition (delegated by Triton) included; launched, it is phase 1
    bit for bit, and a plan that is never launched leaves the tensors as they were."""
    def build_mixed():
        return merged(*[build(seed=40 + k, weight_dtype=dt, master=ms, shapes=[(33,), (0,), (5, 3), (2500,)],
                              layout="strided" if k % 2 else "contiguous") for k, (dt, ms) in enumerate(MIXED)])

    impl = get_backend(backend)
    planned, direct = build_mixed(), build_mixed()
    before = [t.clone() for t, _ in tensors(planned)]
    launch = plan_phase1(impl, planned, dry=dry)
    plan_phase1(impl, build_mixed(), dry=dry)  # prepared, never launched (a skipped step)
    for k, ((t, _), b) in enumerate(zip(tensors(planned), before)):
        assert torch.equal(t, b), f"tensor {k} written before the launch"
    p1, ref = launch(), impl.phase1_batch(direct, dry=dry)
    assert p1.dry == dry
    torch.testing.assert_close(p1.sumsq, ref.sumsq, rtol=0, atol=0)
    steps = torch.full((len(planned.weights),), 1e-3, dtype=torch.float64)
    impl.phase2_batch(planned, p1, steps)
    impl.phase2_batch(direct, ref, steps)
    for k, ((a, _), (b, _)) in enumerate(zip(tensors(direct), tensors(planned))):
        assert_same(b, a, f"tensor {k}")


@pytest.mark.parametrize("backend", OTHER)
def test_grad_sum_of_squares_mixed_dtypes(backend):
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(s, generator=g).to(dt) for s, dt in
             [((7,), torch.float32), ((3000,), torch.bfloat16), ((0,), torch.float16), ((9, 2), torch.float64),
              ((), torch.float32), ((40,), torch.float16)]]
    ref = get_backend("reference").grad_sum_of_squares(grads)
    torch.testing.assert_close(get_backend(backend).grad_sum_of_squares(grads), ref, rtol=1e-12, atol=0)
