"""Property tests: the operators against the independent numpy model of the spec (spec_model.py).

Bit-exact across dtypes (float32, float16, bfloat16, float64), shapes (empty, 0-d,
one element, odd sizes, large) and memory layouts (non-contiguous views), and
hyper-parameters drawn by hypothesis.  The fused operators are compared with the
model of phase 1 + norms + phase 2 within 1e-6 (their norms are float64 sums in a
different order).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mplamb
import spec_model as model

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
HALF = [torch.float16, torch.bfloat16]
SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 1, 4), (33, 17), (1000,)]

hyper = st.fixed_dictionaries({
    "t": st.integers(1, 10**6),
    "wd": st.sampled_from([0.0, 1e-4, 0.01, 0.5]),
    "beta1": st.sampled_from([0.0, 0.5, 0.9, 0.99]),
    "beta2": st.sampled_from([0.0, 0.9, 0.999, 0.99999]),
    "epsilon": st.sampled_from([0.0, 1e-8, 1e-6, 1e-2]),
    "bias_correction": st.booleans(),
    "rescale_grad": st.sampled_from([1.0, 0.5, 2.0**-10, 3.0]),
    "clip_gradient": st.sampled_from([-1.0, 0.0, 0.1, 1.0]),
})
settings.register_profile("mplamb", deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("mplamb")


def make(shape, dtype, seed, *, layout="contiguous", positive=False, scale=1.0):
    """A tensor of ``shape``; ``layout="strided"`` returns a non-contiguous view of a larger buffer
    (every other element), ``"transposed"`` a transposed 2-D tensor."""
    g = torch.Generator().manual_seed(seed)
    if layout == "strided" and len(shape) >= 1:
        x = torch.randn((*shape[:-1], shape[-1] * 2 + 1), generator=g, dtype=torch.float64)
    elif layout == "transposed" and len(shape) == 2:
        x = torch.randn((shape[1], shape[0]), generator=g, dtype=torch.float64)
    else:
        x = torch.randn(tuple(shape), generator=g, dtype=torch.float64)
    x = x.abs() * scale if positive else x * scale
    if layout == "strided" and len(shape) >= 1:
        x = x[..., 1::2]
    elif layout == "transposed" and len(shape) == 2:
        x = x.t()
    return _keep_layout(x, dtype)


def _keep_layout(x, dtype):
    """``x`` converted to ``dtype`` in a buffer with ``x``'s strides (a strided view stays strided)."""
    if x.is_contiguous():
        return x.to(dtype)
    base = torch.empty(x.storage_offset() + 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride())),
                       dtype=dtype)
    out = base.as_strided(x.shape, x.stride(), x.storage_offset())
    out.copy_(x)
    return out


def test_layouts_are_what_they_claim():
    assert not make((7,), torch.float32, 0, layout="strided").is_contiguous()
    assert not make((33, 17), torch.bfloat16, 0, layout="transposed").is_contiguous()


def exact(actual: torch.Tensor, expected_np: np.ndarray, dtype: torch.dtype, what: str):
    expected = model.from_np(expected_np, dtype).reshape(actual.shape)
    a = actual.detach().float() if dtype in HALF else actual.detach()
    e = expected.float() if dtype in HALF else expected
    same = (a == e) | (torch.isnan(a) & torch.isnan(e))
    assert bool(same.all()), f"{what}: {int((~same).sum())} of {same.numel()} elements differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
@given(hp=hyper, seed=st.integers(0, 2**16))
@settings(max_examples=4)
def test_phase1_matches_model(dtype, shape, layout, hp, seed):
    w, grad = make(shape, dtype, seed, layout=layout), make(shape, dtype, seed + 1, layout=layout)
    mean, var = make(shape, dtype, seed + 2, layout=layout), make(shape, dtype, seed + 3, layout=layout, positive=True)
    g_exp, m_exp, v_exp = model.phase1(w, grad, mean, var, **hp)
    g = mplamb.lamb_update_phase1(w, grad, mean, var, **hp)
    assert g.dtype == dtype and g.shape == w.shape
    exact(g, g_exp, dtype, "g")
    exact(mean, m_exp, dtype, "mean")
    exact(var, v_exp, dtype, "var")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@given(hp=hyper, seed=st.integers(0, 2**16))
@settings(max_examples=6)
def test_mp_phase1_matches_model(dtype, shape, layout, hp, seed):
    w32 = make(shape, torch.float32, seed, layout=layout)
    w = w32.to(dtype)
    grad = make(shape, dtype, seed + 1, layout=layout)
    mean = make(shape, torch.float32, seed + 2, layout=layout)
    var = make(shape, torch.float32, seed + 3, layout=layout, positive=True)
    g_exp, m_exp, v_exp = model.phase1(w32, grad.float(), mean, var, **hp)
    w32_before = w32.clone()
    g = mplamb.mp_lamb_update_phase1(w, grad, mean, var, w32, **hp)
    assert g.dtype == torch.float32
    exact(g, g_exp, torch.float32, "g")
    exact(mean, m_exp, torch.float32, "mean")
    exact(var, v_exp, torch.float32, "var")
    assert torch.equal(w32, w32_before)


bounds = st.sampled_from([-1.0, 0.0, 0.5, 2.0, 50.0])
norms = st.sampled_from([0.0, 1e-3, 0.7, 3.0, 1e4, float("inf"), float("nan")])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@given(r1=norms, r2=norms, lb=bounds, ub=bounds, lr=st.sampled_from([0.0, 1e-3, 0.1]), seed=st.integers(0, 2**16),
       in_place=st.booleans(), r_form=st.sampled_from(["float", "0d", "1elem"]))
@settings(max_examples=5)
def test_phase2_matches_model(dtype, shape, layout, r1, r2, lb, ub, lr, seed, in_place, r_form):
    w, g = make(shape, dtype, seed, layout=layout), make(shape, dtype, seed + 1, layout=layout)
    c = model.compute_np(dtype)
    wrap = {"float": lambda r: r, "0d": lambda r: torch.tensor(r), "1elem": lambda r: torch.tensor([r])}[r_form]
    r1v, r2v = float(wrap(r1)), float(wrap(r2))  # a float32 tensor holds the float32 rounding
    expected = model.phase2(model.to_np(w, c), model.to_np(g, c), r1v, r2v, lr=lr, lower_bound=lb, upper_bound=ub)
    w_before, g_before = w.clone(), g.clone()
    out = mplamb.lamb_update_phase2(w, g, wrap(r1), wrap(r2), lr=lr, lower_bound=lb, upper_bound=ub,
                                    out=w if in_place else None)
    exact(out, expected, dtype, "new weight")
    if in_place:
        assert out.data_ptr() == w.data_ptr() if w.numel() else True
    else:
        assert torch.equal(w, w_before)
    assert torch.equal(g, g_before)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", SHAPES)
@given(r1=norms, r2=norms, lb=bounds, ub=bounds, seed=st.integers(0, 2**16))
@settings(max_examples=5)
def test_mp_phase2_matches_model(dtype, shape, r1, r2, lb, ub, seed):
    w32 = make(shape, torch.float32, seed)
    w = w32.to(dtype)
    g = make(shape, torch.float32, seed + 1)
    expected = model.phase2(w32.numpy(), g.numpy(), r1, r2, lr=0.01, lower_bound=lb, upper_bound=ub)
    out = mplamb.mp_lamb_update_phase2(w, g, r1, r2, w32, lr=0.01, lower_bound=lb, upper_bound=ub, out=w)
    exact(w32, expected, torch.float32, "weight32")
    exact(out, expected.astype(np.float32), dtype, "weight")  # rounded once from the float32 master
    assert out.data_ptr() == w.data_ptr() or w.numel() == 0


def test_large_tensor_phase1_and_phase2():
    n = 1_000_003
    w, grad, mean = make((n,), torch.float32, 1), make((n,), torch.float32, 2), make((n,), torch.float32, 3)
    var = make((n,), torch.float32, 4, positive=True)
    g_exp, m_exp, v_exp = model.phase1(w, grad, mean, var, t=7, wd=0.01)
    g = mplamb.lamb_update_phase1(w, grad, mean, var, t=7, wd=0.01)
    exact(g, g_exp, torch.float32, "g")
    exact(var, v_exp, torch.float32, "var")
    r1, r2 = model.norm(w.numpy()), model.norm(g.numpy())
    out = mplamb.lamb_update_phase2(w, g, r1, r2, lr=0.01)
    exact(out, model.phase2(w.numpy(), g.numpy(), r1, r2, lr=0.01), torch.float32, "new weight")


@pytest.mark.parametrize("mp,dtype", [(False, d) for d in DTYPES] + [(True, d) for d in HALF])
@given(seed=st.integers(0, 2**16), hp=hyper, lb=bounds, ub=bounds)
@settings(max_examples=5)
def test_multi_matches_composition_of_phases(mp, dtype, seed, hp, lb, ub):
    shapes = [(7,), (3, 5), (1,), (0,), (), (129,)]
    n = len(shapes)
    state_dtype = torch.float32 if mp else dtype
    w32 = [make(s, torch.float32 if mp else dtype, seed + i) for i, s in enumerate(shapes)]
    ws = [x.to(dtype) for x in w32]
    gs = [make(s, dtype, seed + 10 + i) for i, s in enumerate(shapes)]
    ms = [make(s, state_dtype, seed + 20 + i) for i, s in enumerate(shapes)]
    vs = [make(s, state_dtype, seed + 30 + i, positive=True) for i, s in enumerate(shapes)]
    steps = [hp["t"] + i for i in range(n)]
    lrs = [0.01 * (i + 1) for i in range(n)]
    wds = [hp["wd"] * i for i in range(n)]
    p1 = {k: hp[k] for k in ("beta1", "beta2", "epsilon", "bias_correction", "rescale_grad", "clip_gradient")}
    expected = []
    for i in range(n):
        src = w32[i] if mp else ws[i]
        g, m, v = model.phase1(src, gs[i].float() if mp else gs[i], ms[i], vs[i], t=steps[i], wd=wds[i], **p1)
        c = g.dtype.type
        new = model.phase2(model.to_np(src, c), g, model.norm(model.to_np(src, c)), model.norm(g), lr=lrs[i],
                           lower_bound=lb, upper_bound=ub)
        expected.append((new, m, v))
    kw = dict(step_count=steps, learning_rates=lrs, wds=wds, lower_bound=lb, upper_bound=ub, **p1)
    if mp:
        outs = mplamb.multi_mp_lamb_update(ws, gs, ms, vs, w32, **kw)
    else:
        outs = mplamb.multi_lamb_update(ws, gs, ms, vs, **kw)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    for i, (new, m, v) in enumerate(expected):
        exact(ms[i], m, state_dtype, f"mean {i}")
        exact(vs[i], v, state_dtype, f"var {i}")
        got = (w32[i] if mp else outs[i]).double().numpy()
        fin = np.isfinite(new)
        assert (np.isnan(got) == np.isnan(new)).all()
        scale = max(np.abs(new[fin]).max(initial=0.0), 1e-30)
        assert np.abs(got[fin] - new[fin]).max(initial=0.0) / scale <= tol, i
        if mp:
            assert torch.equal(outs[i], w32[i].to(dtype))
