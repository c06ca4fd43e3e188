"""The fused CPU backend's lean step (:mod:`mplamb.kernels.fused_cpu_lean_kernels`) against the reference's.

Tolerances: every tensor a step writes (codes, scales, weights, compensations, masters) is bitwise
the reference's.  The float64 sums of squares may differ in the last bits (another summation order:
<= 1e-12 relative, the policy of ``tests/test_backends.py``); so that the weights can be compared
bitwise, phase 2 of both backends gets the same step sizes (the reference's), and a whole
``lamb_step`` is compared like ``test_backends``: step sizes within 1e-6, everything bitwise when
they came out equal.  Each case also checks that the fused kernels ran (no silent fallback to the
reference) and that the step changed the weights.
"""
from __future__ import annotations

import pytest
import torch

import mplamb
from mplamb._scalars import phase1_scalars
from mplamb.kernels import codec, fused_cpu, reference
from mplamb.kernels.contract import LambBatch, finish_norms, local_reducer

pytestmark = pytest.mark.skipif(not fused_cpu.AVAILABLE, reason="numba is not installed")

BLOCKED_SHAPES = [(40, 257), (4097,), (3, 7, 300), (1, 4096)]
SMALL_SHAPES = [(0,), (), (1,), (7,), (33, 17), (40, 257)]
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
WEIGHTS = [(F32, "plain"), (BF16, "kahan"), (BF16, "master"), (BF16, "plain"), (F16, "kahan"), (F16, "master"),
           (F16, "plain")]


def _like(x, dtype, layout="contiguous"):
    """``x`` as ``dtype``; ``layout="transposed"``: in a non-contiguous (transposed) tensor, same values."""
    if layout == "transposed" and x.dim() >= 2:
        out = torch.empty(tuple(reversed(x.shape)), dtype=dtype).permute(*reversed(range(x.dim())))
    else:
        out = torch.empty(x.shape, dtype=dtype)
    out.copy_(x)
    return out


def make(fmt, dtype, mode, shapes, *, t=1, layout="contiguous", hp=None, seed=0, separate_outs=False):
    """A lean batch: weights of ``dtype`` with a float32 master / a Kahan compensation / neither (``mode``),
    moments stored in ``fmt`` (random, with an all-zero first block and gradient), step ``t`` (an int, or
    one per tensor); the new weights go to the weights themselves, or with ``separate_outs`` to zeroed
    outputs of their dtype (the weights then only read)."""
    g = torch.Generator().manual_seed(seed)
    hp = hp or {}
    ts = list(t) if isinstance(t, (list, tuple)) else [t] * len(shapes)
    weights, grads, means, vars_, ms, vs, masters, comps, scalars = [], [], [], [], [], [], [], [], []
    for k, s in enumerate(shapes):
        w32 = _like(torch.randn(s, generator=g, dtype=torch.float64) * 0.5, F32, layout)
        w = _like(w32, dtype, layout)
        grad = torch.randn(s, generator=g, dtype=torch.float64) * 3.0
        m = (torch.randn(s, generator=g) * torch.rand(s, generator=g) ** 3) * 0.1
        v = (torch.randn(s, generator=g) * torch.rand(s, generator=g) ** 2) ** 2 * 0.01
        if fmt in codec.BLOCKED:  # one block that stays zero: the a = b = 0 path of the codec
            for x in (m, v, grad):
                x.view(-1)[:200] = 0.0
        qm, sm = codec.encode_mean(m, fmt)
        qv, sv = codec.encode_var(v, fmt, ts[k] + 11)
        weights.append(w)
        grads.append(_like(grad, dtype, layout))
        means.append(qm), vars_.append(qv), ms.append(sm), vs.append(sv)
        masters.append(w32.contiguous() if mode == "master" else None)
        comps.append(codec.kahan_split(w32 + w32 * 1e-3, dtype)[1].contiguous() if mode == "kahan" else None)
        scalars.append(phase1_scalars(t=ts[k], wd=hp.get("wd", 0.01), beta1=0.9, beta2=0.999, epsilon=1e-6,
                                      bias_correction=hp.get("bias_correction", True),
                                      rescale_grad=hp.get("rescale_grad", 1.0),
                                      clip_gradient=hp.get("clip_gradient", -1.0), dtype=F32))
    rescale = hp.get("rescale_tensor")
    blocked = fmt in codec.BLOCKED
    outs = [torch.zeros_like(w) for w in weights] if separate_outs else weights
    return LambBatch(weights=weights, grads=grads, means=means, vars=vars_, masters=masters, outs=outs,
                     scalars=scalars, lrs=[0.01 * (k + 1) for k in range(len(shapes))], moment_format=fmt,
                     mean_scales=ms if blocked else None, var_scales=vs if blocked else None,
                     comps=comps if mode == "kahan" else None, counts=ts,
                     rescale=None if rescale is None else torch.tensor(rescale, dtype=F32))


def written(batch):
    """Every tensor a lean step may write, named."""
    out = []
    for name in ("weights", "means", "vars", "mean_scales", "var_scales", "comps", "masters", "outs"):
        xs = getattr(batch, name)
        if name == "outs" and all(o is w for o, w in zip(xs, batch.weights)):
            continue
        for k, x in enumerate(xs or []):
            if x is not None:
                out.append((f"{name}[{k}]", x))
    return out


def snapshot(batch):
    return [(name, x.clone()) for name, x in written(batch)]


def assert_bitwise(got, want):
    assert [n for n, _ in got] == [n for n, _ in want]
    for (name, a), (_, b) in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), name
        same = (a == b) | (torch.isnan(a) & torch.isnan(b)) if a.is_floating_point() else a == b
        assert bool(same.all()), f"{name}: {int((~same).sum())} of {a.numel()} elements differ"


def check(fmt, dtype, mode, shapes, *, dry=False, steps=1, **kw):
    """``steps`` steps of the fused backend against the reference: sums of squares within 1e-12, then phase 2
    with the same step sizes, and every written tensor bitwise."""
    ref, fast = make(fmt, dtype, mode, shapes, **kw), make(fmt, dtype, mode, shapes, **kw)
    start = snapshot(fast)
    for step in range(steps):
        p_ref = reference.phase1_batch(ref)
        before = snapshot(fast)
        p_fast = fused_cpu.phase1_batch(fast, dry=dry)
        assert p_fast.carry[0] != "reference", "delegated to the reference"
        if dry:
            assert_bitwise(snapshot(fast), before)  # a dry phase 1 writes nothing
            torch.testing.assert_close(p_fast.sumsq[2], reference.grad_sum_of_squares(fast.grads), rtol=1e-12, atol=0)
        torch.testing.assert_close(p_fast.sumsq[:2], p_ref.sumsq, rtol=1e-12, atol=0)
        _, sizes, _ = finish_norms(ref, p_ref.sumsq, local_reducer)
        reference.phase2_batch(ref, p_ref, sizes)
        fused_cpu.phase2_batch(fast, p_fast, sizes)
        assert_bitwise(snapshot(fast), snapshot(ref))
        for b in (ref, fast):
            b.counts = [c + 1 for c in b.counts]
            b.scalars = [phase1_scalars(t=c, wd=sc.wd, beta1=0.9, beta2=0.999, epsilon=1e-6,
                                        bias_correction=sc.bias1 is not None, rescale_grad=sc.rescale,
                                        clip_gradient=-1.0 if sc.clip is None else sc.clip, dtype=F32)
                         for c, sc in zip(b.counts, b.scalars)]
    moved = [name for (name, a), (_, b) in zip(snapshot(fast), start) if name.startswith(("weights", "outs")) and a.numel()
             and not torch.equal(a, b)]
    assert moved, "the step changed no weight"
    return ref, fast


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
@pytest.mark.parametrize("dtype,mode", WEIGHTS)
@pytest.mark.parametrize("dry", [False, True])
def test_blocked_formats_are_bitwise_the_reference(fmt, dtype, mode, dry):
    check(fmt, dtype, mode, BLOCKED_SHAPES, dry=dry)


@pytest.mark.parametrize("fmt,dtype,mode,dry", [("8bit", F16, "kahan", False), ("4bit", F32, "plain", True)])
def test_rows_shorter_than_a_block(fmt, dtype, mode, dry):
    """(4096, 1): 4096 rows of one element, a block each (its own scale); a work item spans many rows."""
    check(fmt, dtype, mode, [(4096, 1), (600, 7)], dry=dry)


@pytest.mark.parametrize("fmt,dtype,mode", [("bf16", d, m) for d, m in WEIGHTS]
                         + [("fp32", BF16, "kahan"), ("fp32", F16, "kahan")])
@pytest.mark.parametrize("dry", [False, True])
def test_elementwise_formats_are_bitwise_the_reference(fmt, dtype, mode, dry):
    check(fmt, dtype, mode, SMALL_SHAPES, dry=dry)


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "bf16"])
@pytest.mark.parametrize("t", [2, 1000, 10**6, (1, 2, 1000)])
def test_step_counts_dither_and_bias_regimes(fmt, t):
    """Late steps take other bias-correction regimes (the mean's divisor 1 from t = 356, both from 17,321);
    the dither depends on each tensor's own t."""
    check(fmt, BF16, "kahan", [(40, 257), (4097,), (1, 4096)], t=t, dry=t == 1000)


def test_several_steps_evolve_the_codes_identically():
    check("4bit", BF16, "kahan", [(40, 257), (3, 7, 300)], steps=3)
    check("8bit", F16, "master", [(4097,)], steps=3, dry=True)


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "bf16", "fp32"])
@pytest.mark.parametrize("t", [1, 1000, 10**6])
def test_kahan_weights_into_separate_outputs(fmt, t):
    """The new weights into outputs of their own (the operators' ``out=``): weights only read, outputs,
    compensations and moments bitwise the reference's, at each bias-correction regime."""
    check(fmt, BF16, "kahan", [(40, 257), (4097,), (1, 4096)], t=t, separate_outs=True)


HYPER = [{"clip_gradient": 0.5}, {"rescale_tensor": 0.37}, {"rescale_grad": 2.0, "clip_gradient": 1.0},
         {"bias_correction": False}, {"wd": 0.0}]


@pytest.mark.parametrize("hp", HYPER, ids=lambda h: ",".join(h))
@pytest.mark.parametrize("fmt,dtype,mode", [("8bit", F32, "plain"), ("4bit", BF16, "master"), ("bf16", F16, "kahan")])
def test_hyper_parameters(hp, fmt, dtype, mode):
    check(fmt, dtype, mode, [(40, 257), (4097,)], hp=hp)


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "bf16"])
@pytest.mark.parametrize("dtype,mode", [(F32, "plain"), (BF16, "kahan"), (F16, "master"), (BF16, "plain")])
@pytest.mark.parametrize("dry", [False, True])
def test_non_contiguous_weights_and_gradients(fmt, dtype, mode, dry):
    probe = make(fmt, dtype, mode, [(40, 257), (3, 7, 300)], layout="transposed")
    assert not probe.weights[0].is_contiguous() and not probe.grads[1].is_contiguous()
    check(fmt, dtype, mode, [(40, 257), (3, 7, 300), (4097,)], layout="transposed", dry=dry)


@pytest.mark.parametrize("fmt", ["8bit", "bf16"])
def test_whole_step_norms_and_step_sizes(fmt):
    ref, fast = make(fmt, BF16, "kahan", [(40, 257), (4097,)]), make(fmt, BF16, "kahan", [(40, 257), (4097,)])
    a, b = reference.lamb_step(ref), fused_cpu.lamb_step(fast)
    torch.testing.assert_close(b.sumsq, a.sumsq, rtol=1e-12, atol=0)
    torch.testing.assert_close(b.step_sizes, a.step_sizes, rtol=1e-6, atol=0)
    if torch.equal(a.step_sizes, b.step_sizes):
        assert_bitwise(snapshot(fast), snapshot(ref))


def test_unsupported_combinations_are_delegated_to_the_reference():
    ref, fast = make("8bit", BF16, "kahan", [(4097,)]), make("8bit", BF16, "kahan", [(4097,)])
    for b in (ref, fast):
        b.outs = [torch.zeros(4097, dtype=F32)]  # an output of another dtype than the Kahan weight
    p = fused_cpu.phase1_batch(fast)
    assert p.carry[0] == "reference"
    p_ref = reference.phase1_batch(ref)
    _, sizes, _ = finish_norms(ref, p_ref.sumsq, local_reducer)
    reference.phase2_batch(ref, p_ref, sizes)
    fused_cpu.phase2_batch(fast, p, sizes)
    assert torch.equal(ref.outs[0], fast.outs[0]) and torch.equal(ref.comps[0], fast.comps[0])


def test_optimizer_trains_bitwise_like_the_reference(monkeypatch):
    calls = []
    lean_phase1 = fused_cpu._lean_phase1_batch
    monkeypatch.setattr(fused_cpu, "_lean_phase1_batch", lambda *a, **k: calls.append(1) or lean_phase1(*a, **k))

    def net():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 96),
                                   torch.nn.LayerNorm(96), torch.nn.Linear(96, 8)).to(BF16)

    nets = [net(), net()]
    opts = [mplamb.Lamb(n.parameters(), lr=1e-2, weight_decay=0.01, moments="8bit", master_weights="kahan",
                        backend=b) for n, b in zip(nets, ("reference", "fused_cpu"))]
    for i in range(5):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(32, 64, generator=g).to(BF16), torch.randn(32, 8, generator=g)
        for n, o in zip(nets, opts):
            o.zero_grad()
            (n(x).float() - y).pow(2).mean().backward()
            o.step()
        for p, q in zip(nets[0].parameters(), nets[1].parameters()):
            assert torch.equal(p, q), f"step {i}"
    assert calls, "the fused lean kernels did not run"
    assert opts[1].state[nets[1][0].weight]["exp_avg"].dtype == torch.int8  # 8-bit codes (8192 elements)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        a, b = opts[0].state[p], opts[1].state[q]
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k
