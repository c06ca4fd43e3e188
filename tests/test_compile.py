"""The operators are torch.library custom ops: torch.compile(fullgraph=True) has no graph break
and the compiled function equals eager bit for bit (the counterpart of MXNet's mx.symbol form)."""
from __future__ import annotations

import pytest
import torch

import mplamb


def _inputs(seed=0, half=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    w32 = torch.randn(37, 5, generator=g)
    return dict(w=w32.clone(), grad=torch.randn(37, 5, generator=g), m=torch.randn(37, 5, generator=g),
                v=torch.rand(37, 5, generator=g), w32=w32, wh=w32.to(half),
                gh=torch.randn(37, 5, generator=g).to(half))


def step_fp32(w, grad, m, v, lr):
    g = mplamb.lamb_update_phase1(w, grad, m, v, t=3, wd=0.01, clip_gradient=1.0)
    r1, r2 = w.norm(), g.norm()
    return mplamb.lamb_update_phase2(w, g, r1, r2, lr=lr, lower_bound=0.1, upper_bound=5.0, out=w)


def step_mp(wh, gh, m, v, w32, lr):
    g = mplamb.mp_lamb_update_phase1(wh, gh, m, v, w32, t=3, wd=0.01, rescale_grad=0.5)
    return mplamb.mp_lamb_update_phase2(wh, g, w32.norm(), g.norm(), w32, lr=lr, out=wh)


def step_multi(ws, gs, ms, vs):
    return mplamb.multi_lamb_update(ws, gs, ms, vs, step_count=[1, 2], learning_rates=[0.1, 0.2], wds=[0.0, 0.01],
                                    out=ws)


def step_multi_mp(ws, gs, ms, vs, w32s):
    return mplamb.multi_mp_lamb_update(ws, gs, ms, vs, w32s, step_count=[4, 5], learning_rates=[0.1, 0.2],
                                       wds=[0.01, 0.0], out=ws)


def _run(fn, make_args, compiled):
    f = torch.compile(fn, fullgraph=True, backend="inductor") if compiled else fn
    args = make_args()
    out = f(*args)
    return out, args


CASES = {
    "phase ops fp32": (step_fp32, lambda: (lambda a: (a["w"], a["grad"], a["m"], a["v"], 0.01))(_inputs())),
    "phase ops mixed precision": (step_mp, lambda: (lambda a: (a["wh"], a["gh"], a["m"], a["v"], a["w32"], 0.01))(
        _inputs())),
    "multi": (step_multi, lambda: (lambda a, b: ([a["w"], b["w"]], [a["grad"], b["grad"]], [a["m"], b["m"]],
                                                 [a["v"], b["v"]]))(_inputs(1), _inputs(2))),
    "multi mixed precision": (step_multi_mp, lambda: (lambda a, b: (
        [a["wh"], b["wh"]], [a["gh"], b["gh"]], [a["m"], b["m"]], [a["v"], b["v"]], [a["w32"], b["w32"]]))(
        _inputs(1), _inputs(2))),
}


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    out = []
    for y in x:
        out += _flat(y) if isinstance(y, (list, tuple)) else ([y] if isinstance(y, torch.Tensor) else [])
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_equals_eager_bitwise(name):
    torch._dynamo.reset()
    fn, make_args = CASES[name]
    eager_out, eager_args = _run(fn, make_args, compiled=False)
    comp_out, comp_args = _run(fn, make_args, compiled=True)
    for a, b in zip(_flat(eager_out) + _flat(eager_args), _flat(comp_out) + _flat(comp_args)):
        assert a.dtype == b.dtype
        assert torch.equal(a, b), name


def test_operators_are_registered_custom_ops():
    for op in ("lamb_update_phase1", "mp_lamb_update_phase1", "lamb_update_phase2", "mp_lamb_update_phase2",
               "multi_lamb_update", "multi_mp_lamb_update"):
        assert hasattr(torch.ops.mplamb, op)
