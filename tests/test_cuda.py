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
    assert int(cpu_skips) == int(gpu_skips) == 1
    for a, b in zip(cpu_ps, gpu_ps):
        torch.testing.assert_close(b, a, rtol=RTOL[dtype], atol=1e-6)


# ---------------------------------------------------------------- capturable steps and CUDA graphs


def _mlp(dtype, seed=0, width=256, layers=3):
    torch.manual_seed(seed)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*mods, torch.nn.Linear(width, 8)).to("cuda", dtype)


def _batches(n, width=256, inf_at=()):
    g = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.randn(64, width, device="cuda", generator=g) for _ in range(n)]
    for i in inf_at:
        xs[i][0, 0] = float("inf")
    return xs


def _state(opt):
    return [(int(st["step"]), st["exp_avg"].clone(), st["exp_avg_sq"].clone(), st.get("master_weight"))
            for st in opt.state.values()]


def _train(model, opt, xs, *, graph, scaler=None, sched=None, dtype=torch.float32):
    """Forward, backward and opt.step() over ``xs``: eagerly, or captured once in a CUDA graph and
    replayed (torch's whole-network recipe: warm-up on a side stream, then capture)."""
    lossf = lambda x: model(x.to(dtype)).float().pow(2).mean()  # noqa: E731

    def step(x):
        loss = lossf(x)
        (scaler.scale(loss) if scaler else loss).backward()
        scaler.step(opt) if scaler else opt.step()
        if scaler:
            scaler.update()
        return loss.detach()

    if not graph:
        for x in xs:
            opt.zero_grad(set_to_none=True)
            step(x)
            if sched:
                sched.step()
        return
    static_x = xs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the warm-up: the first step, eagerly
        opt.zero_grad(set_to_none=True)
        step(xs[0])
        if sched:
            sched.step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(g):
        step(static_x)
    for x in xs[1:]:
        static_x.copy_(x)
        g.replay()
        if sched:
            sched.step()
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype,scaled", [(torch.float32, False), (torch.bfloat16, False), (torch.float16, True)],
                         ids=["fp32", "bf16-masters", "fp16-gradscaler"])
def test_whole_training_step_captures_in_a_cuda_graph(dtype, scaled):
    """forward + backward + step (+ GradScaler) captured once and replayed for 12 steps with a scheduled
    tensor lr and two non-finite steps: the same run as eager, step counts and skips exactly."""
    import mplamb

    runs = []
    for graph in (False, True):
        model = _mlp(dtype)
        lr = torch.tensor(0.01, device="cuda", dtype=torch.float64)
        opt = mplamb.Lamb(model.parameters(), lr=lr, weight_decay=0.01, max_grad_norm=1.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10) if scaled else None
        _train(model, opt, _batches(13, inf_at=(4, 9)), graph=graph, scaler=scaler, sched=sched, dtype=dtype)
        runs.append(([p.detach().clone() for p in model.parameters()], _state(opt), int(opt.skipped_steps)))
    (pe, se, ke), (pg, sg, kg) = runs
    assert ke == kg == 2
    assert [s[0] for s in se] == [s[0] for s in sg] == [11] * len(se)
    for a, b in zip(pe, pg):  # cuBLAS may pick other algorithms under capture: forward/backward within rounding
        torch.testing.assert_close(b, a, rtol=2e-2 if dtype != torch.float32 else 1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_captured_optimizer_step_is_bitwise_the_eager_one(dtype):
    """opt.step() alone captured and replayed on fixed gradients (a scheduled lr, a NaN step, clipping):
    bitwise the eager capturable step, and the eager step bitwise the host-decided one."""
    import mplamb

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(1000, 300), (300,), (7,), (1,), (4097, 3)]
    init = [torch.randn(s, device="cuda", generator=g) * 0.1 for s in shapes]
    grads = [[torch.randn(s, device="cuda", generator=g) for s in shapes] for _ in range(8)]
    grads[3][1][5] = float("nan")
    results = []
    for mode in ("host", "eager", "graph"):
        ps = [torch.nn.Parameter(x.to(dtype, copy=True)) for x in init]
        lr = torch.tensor(0.01, device="cuda", dtype=torch.float64)
        opt = mplamb.Lamb(ps, lr=lr, weight_decay=0.01, max_grad_norm=5.0, capturable=mode != "host")
        for p, gr in zip(ps, grads[0]):
            p.grad = gr.to(dtype, copy=True)  # (the loop below copies into these: never grads[0] itself)
        opt.step()  # warm-up (eager) in every mode
        lr.fill_(0.005)
        if mode == "graph":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
        for k, step in enumerate(grads[1:]):
            for p, gr in zip(ps, step):
                p.grad.copy_(gr.to(dtype))
            graph.replay() if mode == "graph" else opt.step()
            lr.fill_(0.005 / (k + 2))
        torch.cuda.synchronize()
        results.append(([p.detach().clone() for p in ps], _state(opt), int(opt.skipped_steps)))
    (ph, sh, kh), (pe, se, ke), (pg, sg, kg) = results
    assert kh == ke == kg == 1
    for a, b, c in zip(ph, pe, pg):
        assert torch.equal(a, b) and torch.equal(b, c)
    for a, b, c in zip(sh, se, sg):
        assert a[0] == b[0] == c[0] == 7
        for x, y, z in zip(a[1:], b[1:], c[1:]):
            assert (x is None and y is None and z is None) or (torch.equal(x, y) and torch.equal(y, z))


def test_kernel_launches_per_step_do_not_grow_with_parameters():
    """Kernels launched by one capturable step (torch.profiler): the same for 8 tensors as for 800."""
    import mplamb
    from torch.profiler import ProfilerActivity, profile

    counts = []
    for n in (8, 800):
        ps = [torch.nn.Parameter(torch.randn(257, device="cuda")) for _ in range(n)]
        opt = mplamb.Lamb(ps, lr=0.01, max_grad_norm=1.0)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        opt.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        counts.append(sum(1 for e in prof.events() if e.device_type.name == "CUDA"))
    assert counts[0] == counts[1], counts


def test_compiled_training_step_reduce_overhead():
    """torch.compile(mode="reduce-overhead") of a whole training step: runs, and trains as eager does."""
    import mplamb

    results = []
    for compiled in (False, True):
        model = _mlp(torch.float32, layers=2)
        opt = mplamb.Lamb(model.parameters(), lr=0.01, weight_decay=0.01)

        def train_step(x):
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        fn = torch.compile(train_step, mode="reduce-overhead") if compiled else train_step
        for x in _batches(6):
            fn(x)
        torch.cuda.synchronize()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_lamb_under_fsdp2_cpu_offload_matches_lamb_on_the_gpu():
    """FSDP2 with CPUOffloadPolicy: Lamb steps the CPU shards (fused CPU kernels) and ends where Lamb on the
    GPU without offload does (benchmarks/cpu_offload.py checks it and exits non-zero otherwise)."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_offload.py"
    out = subprocess.run([sys.executable, str(script), "--layers", "2", "--width", "64", "--steps", "4"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "MASTER_PORT": "29533"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
