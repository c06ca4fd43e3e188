"""Bad input to the operators: a clear ValueError/TypeError naming the argument, and nothing mutated.

One table of cases, each a function building the arguments and the expected
exception and message; every case runs against a fresh set of tensors whose
contents are compared before and after the failed call.
"""
from __future__ import annotations

import pytest
import torch

import mplamb


def fresh(n=6, half=torch.float16):
    torch.manual_seed(0)
    w32 = torch.randn(n)
    return dict(w=w32.clone(), g=torch.randn(n), m=torch.randn(n), v=torch.rand(n), w32=w32,
                wh=w32.to(half), gh=torch.randn(n).to(half), out=torch.zeros(n))


def p1(a, **kw):
    kw = {"t": 1, "wd": 0.0, **kw}
    return mplamb.lamb_update_phase1(a["w"], a["g"], a["m"], a["v"], **kw)


def mp1(a, **kw):
    kw = {"t": 1, "wd": 0.0, **kw}
    return mplamb.mp_lamb_update_phase1(a["wh"], a["gh"], a["m"], a["v"], a["w32"], **kw)


def p2(a, r1=1.0, r2=1.0, **kw):
    kw = {"lr": 0.1, **kw}
    return mplamb.lamb_update_phase2(a["w"], a["g"], r1, r2, **kw)


def mp2(a, **kw):
    kw = {"lr": 0.1, **kw}
    return mplamb.mp_lamb_update_phase2(a["wh"], a["g"], 1.0, 1.0, a["w32"], **kw)


def multi(a, n=1, **kw):
    base = dict(step_count=[1] * n, learning_rates=[0.1] * n, wds=[0.0] * n)
    base.update(kw)
    return mplamb.multi_lamb_update([a["w"]], [a["g"]], [a["m"]], [a["v"]], **base)


def mmulti(a, **kw):
    base = dict(step_count=[1], learning_rates=[0.1], wds=[0.0])
    base.update(kw)
    return mplamb.multi_mp_lamb_update([a["wh"]], [a["gh"]], [a["m"]], [a["v"]], [a["w32"]], **base)


CASES = [
    # name, call, exception, message fragment
    ("t=0", lambda a: p1(a, t=0), ValueError, "t: expected an int >= 1"),
    ("t negative", lambda a: mp1(a, t=-3), ValueError, "t: expected an int >= 1"),
    ("t float", lambda a: p1(a, t=1.5), TypeError, "t: expected an int"),
    ("t bool", lambda a: p1(a, t=True), TypeError, "t: expected an int"),
    ("missing t", lambda a: mplamb.lamb_update_phase1(a["w"], a["g"], a["m"], a["v"], wd=0.0), TypeError, "'t'"),
    ("missing wd", lambda a: mplamb.lamb_update_phase1(a["w"], a["g"], a["m"], a["v"], t=1), TypeError, "'wd'"),
    ("beta1 = 1", lambda a: p1(a, beta1=1.0), ValueError, "beta1: expected a number in [0, 1)"),
    ("beta2 < 0", lambda a: mp1(a, beta2=-0.1), ValueError, "beta2"),
    ("beta NaN", lambda a: p1(a, beta1=float("nan")), ValueError, "beta1"),
    ("epsilon < 0", lambda a: p1(a, epsilon=-1e-8), ValueError, "epsilon"),
    ("wd inf", lambda a: p1(a, wd=float("inf")), ValueError, "wd"),
    ("wd str", lambda a: p1(a, wd="0.1"), TypeError, "wd"),
    ("rescale NaN", lambda a: p1(a, rescale_grad=float("nan")), ValueError, "rescale_grad"),
    ("bias_correction int", lambda a: p1(a, bias_correction=1), TypeError, "bias_correction"),
    ("grad dtype", lambda a: mplamb.lamb_update_phase1(a["w"], a["g"].double(), a["m"], a["v"], t=1, wd=0.0),
     TypeError, "grad: expected dtype float32"),
    ("grad shape", lambda a: mplamb.lamb_update_phase1(a["w"], a["g"][:3], a["m"], a["v"], t=1, wd=0.0),
     ValueError, "grad: expected shape (6,)"),
    ("int weight", lambda a: mplamb.lamb_update_phase1(a["w"].int(), a["g"].int(), a["m"].int(), a["v"].int(), t=1,
                                                        wd=0.0), TypeError, "weight: expected dtype"),
    ("weight not a tensor", lambda a: mplamb.lamb_update_phase1([1.0], a["g"], a["m"], a["v"], t=1, wd=0.0),
     TypeError, "weight: expected a torch.Tensor"),
    ("sparse grad", lambda a: mplamb.lamb_update_phase1(a["w"], a["g"].to_sparse(), a["m"], a["v"], t=1, wd=0.0),
     TypeError, "grad: sparse"),
    ("mp fp32 weight", lambda a: mplamb.mp_lamb_update_phase1(a["w"], a["g"], a["m"], a["v"], a["w32"], t=1, wd=0.0),
     TypeError, "weight: expected dtype float16 or bfloat16"),
    ("mp fp16 state", lambda a: mplamb.mp_lamb_update_phase1(a["wh"], a["gh"], a["m"].half(), a["v"], a["w32"], t=1,
                                                             wd=0.0), TypeError, "mean: expected dtype float32"),
    ("mp grad dtype mismatch", lambda a: mplamb.mp_lamb_update_phase1(a["wh"], a["gh"].bfloat16(), a["m"], a["v"],
                                                                      a["w32"], t=1, wd=0.0), TypeError, "grad"),
    ("grad on another device", lambda a: mplamb.lamb_update_phase1(a["w"], torch.empty(6, device="meta"), a["m"],
                                                                   a["v"], t=1, wd=0.0), ValueError,
     "grad: expected device cpu"),
    ("multi weights on two devices", lambda a: mplamb.multi_lamb_update(
        [a["w"], torch.empty(6, device="meta")], [a["g"]] * 2, [a["m"], a["m"].clone()], [a["v"], a["v"].clone()],
        step_count=[1, 1], learning_rates=[0.1, 0.1], wds=[0.0, 0.0]), ValueError, "weights[1]: expected device cpu"),
    ("mean aliases var", lambda a: mplamb.lamb_update_phase1(a["w"], a["g"], a["m"], a["m"], t=1, wd=0.0),
     ValueError, "shares memory"),
    ("mean aliases grad", lambda a: mplamb.lamb_update_phase1(a["w"], a["g"], a["g"], a["v"], t=1, wd=0.0),
     ValueError, "shares memory"),
    ("expanded mean", lambda a: mplamb.lamb_update_phase1(a["w"], a["g"], torch.zeros(1).expand(6), a["v"], t=1,
                                                         wd=0.0), ValueError, "internally overlapping"),
    ("lr negative", lambda a: p2(a, lr=-0.1), ValueError, "lr: expected a number >= 0"),
    ("lr NaN", lambda a: p2(a, lr=float("nan")), ValueError, "lr"),
    ("missing lr", lambda a: mplamb.lamb_update_phase2(a["w"], a["g"], 1.0, 1.0), TypeError, "'lr'"),
    ("r1 two elements", lambda a: p2(a, r1=torch.ones(2)), ValueError, "r1: expected one element"),
    ("r2 string", lambda a: p2(a, r2="1"), TypeError, "r2"),
    ("out shape", lambda a: p2(a, out=torch.zeros(5)), ValueError, "out: expected shape"),
    ("out dtype", lambda a: p2(a, out=torch.zeros(6, dtype=torch.float64)), TypeError, "out: expected dtype"),
    ("out overlaps g", lambda a: p2(a, out=a["g"]), ValueError, "shares memory"),
    ("out partial overlap", lambda a: mplamb.lamb_update_phase2(a["w"][:4], a["g"][:4], 1.0, 1.0, lr=0.1,
                                                                out=a["w"][1:5]), ValueError, "shares memory"),
    ("mp2 g dtype", lambda a: mplamb.mp_lamb_update_phase2(a["wh"], a["g"].half(), 1.0, 1.0, a["w32"], lr=0.1),
     TypeError, "g: expected dtype float32"),
    ("mp2 fp32 weight", lambda a: mplamb.mp_lamb_update_phase2(a["w"], a["g"], 1.0, 1.0, a["w32"], lr=0.1),
     TypeError, "weight: expected dtype float16"),
    ("multi empty", lambda a: mplamb.multi_lamb_update([], [], [], [], step_count=[], learning_rates=[], wds=[]),
     ValueError, "weights: expected at least one tensor"),
    ("multi step_count length", lambda a: multi(a, step_count=[1, 2]), ValueError, "step_count: expected 1 entries"),
    ("multi learning_rates length", lambda a: multi(a, learning_rates=[]), ValueError, "learning_rates: expected 1"),
    ("multi wds length", lambda a: multi(a, wds=[0.0, 0.0]), ValueError, "wds: expected 1"),
    ("multi step 0", lambda a: multi(a, step_count=[0]), ValueError, "step_count[0]"),
    ("multi lr negative", lambda a: multi(a, learning_rates=[-1.0]), ValueError, "learning_rates[0]"),
    ("multi beta", lambda a: multi(a, beta2=1.5), ValueError, "beta2"),
    ("multi grads length", lambda a: mplamb.multi_lamb_update([a["w"]], [a["g"], a["g"]], [a["m"]], [a["v"]],
                                                              step_count=[1], learning_rates=[0.1], wds=[0.0]),
     ValueError, "grads: expected 1 entries"),
    ("multi grads not list", lambda a: mplamb.multi_lamb_update([a["w"]], a["g"], [a["m"]], [a["v"]],
                                                                step_count=[1], learning_rates=[0.1], wds=[0.0]),
     TypeError, "grads: expected a list of tensors"),
    ("multi mp fp32 weights", lambda a: mplamb.multi_mp_lamb_update([a["w"]], [a["g"]], [a["m"]], [a["v"]],
                                                                    [a["w32"]], step_count=[1], learning_rates=[0.1],
                                                                    wds=[0.0]), TypeError, "weights[0]"),
    ("multi mp weights32 None", lambda a: mplamb.multi_mp_lamb_update([a["wh"]], [a["gh"]], [a["m"]], [a["v"]], None,
                                                                      step_count=[1], learning_rates=[0.1], wds=[0.0]),
     TypeError, "weights32"),
    ("multi backend unknown", lambda a: multi(a, backend="cuda-magic"), ValueError, "backend"),
    ("multi out shape", lambda a: mmulti(a, out=[torch.zeros(3, dtype=torch.float16)]), ValueError, "out[0]"),
]


@pytest.mark.parametrize("name,call,exc,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_and_mutates_nothing(name, call, exc, fragment):
    a = fresh()
    before = {k: v.clone() for k, v in a.items()}
    with pytest.raises(exc) as info:
        call(a)
    assert fragment in str(info.value), str(info.value)
    for k, v in a.items():
        assert torch.equal(v, before[k]), f"{k} was changed by a rejected call"


def test_later_tensor_error_mutates_nothing_in_earlier_tensors():
    """A bad tensor at index 2 of a fused call is caught before tensors 0 and 1 are touched."""
    torch.manual_seed(0)
    ws = [torch.randn(4) for _ in range(3)]
    gs = [torch.randn(4), torch.randn(4), torch.randn(5)]
    ms = [torch.zeros(4) for _ in range(3)]
    vs = [torch.zeros(4) for _ in range(3)]
    snap = [t.clone() for t in ws + ms + vs]
    with pytest.raises(ValueError, match=r"grads\[2\]: expected shape"):
        mplamb.multi_lamb_update(ws, gs, ms, vs, step_count=[1] * 3, learning_rates=[0.1] * 3, wds=[0.0] * 3, out=ws)
    for t, s in zip(ws + ms + vs, snap):
        assert torch.equal(t, s)
