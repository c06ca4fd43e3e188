"""The Triton backend compiled for a real GPU, against the reference backend on the CPU.

Skipped without CUDA (CI has none; there the same kernels run under ``TRITON_INTERPRET=1`` in
``test_backends.py``).  On a GPU machine run ``TRITON_INTERPRET=0 pytest tests/test_cuda.py``.
Same tolerances as ``test_backends.py``: moments bit-identical, weights bit-identical whenever
the float64 norms are (another summation order may change their last bits).
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mplamb.kernels import LambBatch, available_backends, get_backend
from test_backends import DTYPE_MODES, HP, MIXED, RTOL, SHAPES, assert_same, build, merged, tensors

CUDA = (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
        and "triton" in available_backends("cuda"))
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU, triton, and TRITON_INTERPRET unset or 0")


def to_device(batch: LambBatch, device: str = "cuda") -> LambBatch:
    """``batch`` on ``device`` with the same strides and the same aliasing (out is weight, ...)."""
    moved = {}

    def mv(t):
        if t is None:
            return None
        if id(t) not in moved:
            c = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            c.copy_(t)
            moved[id(t)] = c
        return moved[id(t)]

    fields = {f: [mv(t) for t in getattr(batch, f)] for f in ("weights", "grads", "means", "vars", "masters", "outs")}
    return LambBatch(**fields, scalars=batch.scalars, lrs=batch.lrs, adapt=batch.adapt,
                     lower_bound=batch.lower_bound, upper_bound=batch.upper_bound,
                     max_trust_ratio=batch.max_trust_ratio,
                     rescale=None if batch.rescale is None else batch.rescale.to(device), uniform=batch.uniform)


def compare(ref_batch, ref, gpu_batch, gpu):
    """Float64 tensors go to the reference backend, i.e. torch's CUDA kernels, which may contract
    into FMAs: those are compared within RTOL, not bit for bit."""
    steps = gpu.step_sizes.cpu()
    exact_norms = bool(((steps == ref.step_sizes) | (steps.isnan() & ref.step_sizes.isnan())).all())
    for k, ((a, moment), (b, _)) in enumerate(zip(tensors(ref_batch), tensors(gpu_batch))):
        b = b.cpu()
        if (moment or exact_norms) and a.dtype != torch.float64:
            assert_same(b.contiguous(), a.contiguous(), f"tensor {k}")
        else:
            scale = float(a.double().nan_to_num(0.0, 0.0, 0.0).abs().max()) if a.numel() else 0.0
            torch.testing.assert_close(b, a, rtol=RTOL[a.dtype], atol=RTOL[a.dtype] * scale, equal_nan=True)
    torch.testing.assert_close(gpu.sumsq.cpu(), ref.sumsq, rtol=1e-12, atol=0, equal_nan=True)
    torch.testing.assert_close(gpu.step_sizes.cpu(), ref.step_sizes, rtol=1e-6, atol=0, equal_nan=True)
    return exact_norms


def gpu_vs_cpu(dry=False, **kw):
    ref_batch = build(**kw)
    gpu_batch = to_device(build(**kw))
    ref = get_backend("reference").lamb_step(ref_batch)
    gpu = get_backend("triton", "cuda").lamb_step(gpu_batch, dry=dry)
    torch.cuda.synchronize()
    return compare(ref_batch, ref, gpu_batch, gpu)


LARGE = SHAPES + [(1_000_003,), (1024, 1025)]


@pytest.mark.parametrize("dtype,master", DTYPE_MODES)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("dry", [False, True])
def test_triton_gpu_matches_reference(dtype, master, layout, dry):
    gpu_vs_cpu(dry=dry, seed=11, weight_dtype=dtype, master=master, shapes=LARGE, layout=layout)


def test_triton_gpu_out_not_in_place():
    gpu_vs_cpu(seed=3, weight_dtype=torch.float32, master=False, shapes=LARGE, out_mode="new")


@pytest.mark.parametrize("dtype,master", DTYPE_MODES[:4])
@given(hp=HP, seed=st.integers(0, 1000), dry=st.booleans())
@settings(max_examples=10, deadline=None)
def test_triton_gpu_hyper_parameters(dtype, master, hp, seed, dry):
    gpu_vs_cpu(dry=dry, seed=seed, weight_dtype=dtype, master=master, shapes=[(5,), (3000,), (1,)], hp=hp)


def test_triton_gpu_mixed_partitions_and_non_finite():
    def make():
        b = merged(*[build(seed=30 + k, weight_dtype=dt, master=ms, shapes=[(33,), (70_001,)])
                     for k, (dt, ms) in enumerate(MIXED)])
        b.grads[1].view(-1)[:3] = torch.tensor([float("nan"), float("inf"), 1e30])
        return b

    ref_batch, gpu_batch = make(), to_device(make())
    ref = get_backend("reference").lamb_step(ref_batch)
    gpu = get_backend("triton", "cuda").lamb_step(gpu_batch)
    compare(ref_batch, ref, gpu_batch, gpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_triton_gpu_grad_sum_of_squares(dtype):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=g).to(dtype) for s in [(0,), (), (5,), (2_000_001,)]]
    grads.append(torch.randn(40, 30, generator=g).to(dtype).t())
    ref = get_backend("reference").grad_sum_of_squares(grads)
    got = get_backend("triton", "cuda").grad_sum_of_squares([x.cuda() for x in grads])
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-12, atol=0)


def test_triton_gpu_is_deterministic():
    runs = []
    for _ in range(2):
        b = to_device(build(seed=5, weight_dtype=torch.bfloat16, master=True, shapes=[(3_000_000,), (3, 7)]))
        get_backend("triton", "cuda").lamb_step(b)
        runs.append([t.cpu() for t, _ in tensors(b)])
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lamb_on_gpu_matches_lamb_on_cpu(dtype):
    """The optimizer end to end (gradient pass, skip check, clipping, both phases) on the GPU."""
    import mplamb

    g = torch.Generator().manual_seed(0)
    shapes = [(300, 70), (70,), (5,), (1,)]
    init = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(4)]
    grads[2][1][0] = float("nan")  # one skipped step
    results = []
    for device, backend in (("cpu", "reference"), ("cuda", "triton")):
        ps = [torch.nn.Parameter(x.to(device=device, dtype=dtype, copy=True)) for x in init]
        opt = mplamb.Lamb(ps, lr=0.01, weight_decay=0.01, max_grad_norm=1.0, backend=backend)
        for step in grads:
            for p, gr in zip(ps, step):
                p.grad = gr.to(device=device, dtype=dtype)
            opt.step()
        results.append(([p.detach().cpu() for p in ps], opt.skipped_steps))
    (cpu_ps, cpu_skips), (gpu_ps, gpu_skips) = results
    assert cpu_skips == gpu_skips == 1
    for a, b in zip(cpu_ps, gpu_ps):
        torch.testing.assert_close(b, a, rtol=RTOL[dtype], atol=1e-6)
