"""The Triton backend's lean step (:mod:`mplamb.kernels.triton_lean_kernels`) against the reference's.

On a machine without a GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set by
``conftest.py``); with ``TRITON_INTERPRET=0`` and a CUDA GPU (``scripts/gpu_check.sh``) they run on the
GPU, against the reference on the CPU.  Tolerances as in ``tests/test_lean_fused.py``: every tensor a
step writes (codes, scales, weights, compensations, masters) is bitwise the reference's; the float64
sums of squares may differ in the last bits (another summation order: <= 1e-12 relative), so phase 2
of both backends gets the same step sizes (the reference's), and a whole ``lamb_step`` is compared
like ``test_backends``: step sizes within 1e-6, everything bitwise when they came out equal.  Each
case checks that the Triton kernels ran (no silent delegation to the reference) and that the step
changed the weights.  Shapes are small: the interpreter runs a program at a time.
"""
from __future__ import annotations

import os

import pytest
import torch

import mplamb
from mplamb._scalars import bias_table, phase1_scalars
from mplamb.kernels import codec, reference
from mplamb.kernels.contract import DeviceScalars, LambBatch, finish_norms, local_reducer
from test_lean_fused import BF16, F16, F32, HYPER, WEIGHTS, assert_bitwise, make, snapshot

try:
    from mplamb.kernels import triton_gpu, triton_lean
except ImportError:  # triton's absence makes triton_gpu.AVAILABLE False; triton_lean needs it
    triton_gpu = triton_lean = None

GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "0"
DEVICE = torch.device("cuda" if GPU else "cpu")
pytestmark = pytest.mark.skipif(triton_lean is None or not triton_gpu.AVAILABLE
                                or not triton_gpu.supports_device(DEVICE),
                                reason="needs triton, and TRITON_INTERPRET=1 without a GPU")

# a few programs each (a format applies to whatever a batch holds: the codec's 4096-element threshold is the
# optimizer's choice): rows of 2 blocks + 1 element, one row of 17 blocks (the last of one element), 3-d
BLOCKED_SHAPES = [(9, 257), (4097,), (3, 5, 60)]
SMALL_SHAPES = [(0,), (), (1,), (7,), (33, 17), (5, 0), (3, 1001)]
SHAPES2 = [(9, 257), (4097,)]


def to_device(batch: LambBatch) -> LambBatch:
    """``batch`` on :data:`DEVICE`, with the same strides and aliasing (outs are the weights)."""
    if DEVICE.type == "cpu":
        return batch
    moved = {}

    def mv(t):
        if t is None:
            return None
        if id(t) not in moved:
            c = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=DEVICE)
            c.copy_(t)
            moved[id(t)] = c
        return moved[id(t)]

    def mvs(xs):
        return None if xs is None else [mv(t) for t in xs]

    on = batch.on_device
    if on is not None:
        on = DeviceScalars(steps=mvs(on.steps), bias=mv(on.bias), lr=mv(on.lr), skip=mv(on.skip))
    return LambBatch(weights=mvs(batch.weights), grads=mvs(batch.grads), means=mvs(batch.means), vars=mvs(batch.vars),
                     masters=mvs(batch.masters), outs=mvs(batch.outs), scalars=batch.scalars, lrs=batch.lrs,
                     rescale=mv(batch.rescale), on_device=on, moment_format=batch.moment_format,
                     mean_scales=mvs(batch.mean_scales), var_scales=mvs(batch.var_scales), comps=mvs(batch.comps),
                     counts=batch.counts, offsets=batch.offsets)


def host(snap):
    return [(name, x.cpu()) for name, x in snap]


def capturable(batch: LambBatch, skip: bool, bias_correction: bool = True) -> LambBatch:
    """``batch`` with its step counts, bias table, lr and skip flag as device scalars (counts ``t - 1``)."""
    batch.on_device = DeviceScalars(steps=[torch.tensor(float(t - 1)) for t in batch.counts],
                                    bias=bias_table(0.9, 0.999, bias_correction, F32),
                                    lr=torch.tensor(0.01, dtype=torch.float64), skip=torch.tensor(skip))
    batch.counts = [1] * len(batch.weights)  # (what the optimizer passes: the host never knows the counts)
    return batch


def next_step(b: LambBatch) -> None:
    """Host step counts and scalars of the next step."""
    b.counts = [c + 1 for c in b.counts]
    b.scalars = [phase1_scalars(t=c, wd=sc.wd, beta1=0.9, beta2=0.999, epsilon=1e-6,
                                bias_correction=sc.bias1 is not None, rescale_grad=sc.rescale,
                                clip_gradient=-1.0 if sc.clip is None else sc.clip, dtype=F32)
                 for c, sc in zip(b.counts, b.scalars)]


def check(fmt, dtype, mode, shapes, *, dry=False, steps=1, skip=None, delegated=0, **kw):
    """``steps`` steps of the Triton backend against the reference: sums of squares within 1e-12, then phase 2
    with the same step sizes, and every written tensor bitwise.  ``skip`` (a bool): capturable batches with
    that skip flag.  ``delegated``: how many partitions the reference is expected to step."""
    grads = kw.pop("grads", None)
    ref, fast = make(fmt, dtype, mode, shapes, **kw), make(fmt, dtype, mode, shapes, **kw)
    if grads is not None:
        for b in (ref, fast):
            b.grads = [g.to(grads) for g in b.grads]
    if skip is not None:
        ref, fast = capturable(ref, skip, kw.get("hp", {}).get("bias_correction", True)), \
            capturable(fast, skip, kw.get("hp", {}).get("bias_correction", True))
    fast = to_device(fast)
    start = host(snapshot(fast))
    for step in range(steps):
        p_ref = reference.phase1_batch(ref, dry=dry)
        before = snapshot(fast)
        p_fast = triton_gpu.phase1_batch(fast, dry=dry)
        launches = p_fast.carry[0]
        assert sum(isinstance(x, triton_gpu._Delegated) for x in launches) == delegated
        assert len(launches) > delegated, "no Triton launch"
        if dry:
            assert_bitwise(host(snapshot(fast)), host(before))  # a dry phase 1 writes nothing
            torch.testing.assert_close(p_fast.sumsq[2].cpu(), reference.grad_sum_of_squares(ref.grads),
                                       rtol=1e-12, atol=0)
        torch.testing.assert_close(p_fast.sumsq[:2].cpu(), p_ref.sumsq[:2], rtol=1e-12, atol=0)
        _, sizes, _ = finish_norms(ref, p_ref.sumsq[:2], local_reducer)
        reference.phase2_batch(ref, p_ref, sizes)
        triton_gpu.phase2_batch(fast, p_fast, sizes.to(DEVICE))
        assert_bitwise(host(snapshot(fast)), snapshot(ref))
        if skip is None:
            next_step(ref), next_step(fast)
        else:  # the device counts advanced (or not) as the reference's
            assert [float(c) for c in fast.on_device.steps] == [float(c) for c in ref.on_device.steps]
    moved = [name for (name, a), (_, b) in zip(host(snapshot(fast)), start) if name.startswith("weights")
             and a.numel() and not torch.equal(a, b)]
    assert (not moved) if skip else moved, "a skipped step changed a weight" if skip else "no weight changed"
    return ref, fast


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
@pytest.mark.parametrize("dtype,mode", WEIGHTS)
def test_blocked_formats_are_bitwise_the_reference(fmt, dtype, mode):
    check(fmt, dtype, mode, BLOCKED_SHAPES)


@pytest.mark.parametrize("fmt,dtype,mode", [("8bit", BF16, "kahan"), ("4bit", F16, "master"), ("4bit", F32, "plain")])
def test_dry_phase1_writes_nothing_and_phase2_writes_it_all(fmt, dtype, mode):
    check(fmt, dtype, mode, BLOCKED_SHAPES, dry=True)


@pytest.mark.parametrize("fmt,dtype,mode,dry", [("8bit", F16, "kahan", False), ("4bit", F32, "plain", True),
                                                ("4bit", BF16, "master", False)])
def test_rows_shorter_than_a_block_and_odd_rows(fmt, dtype, mode, dry):
    """(512, 1) and (300, 7): one block a row, narrow tiles; (12, 129): a last block of one element and (4-bit)
    a lone low nibble per row; (0, 300): an empty shard of rows."""
    check(fmt, dtype, mode, [(512, 1), (300, 7), (12, 129), (0, 300)], dry=dry)


@pytest.mark.parametrize("fmt,dtype,mode", [("bf16", d, m) for d, m in WEIGHTS]
                         + [("fp32", BF16, "kahan"), ("fp32", F16, "kahan")])
@pytest.mark.parametrize("dry", [False, True])
def test_elementwise_formats_are_bitwise_the_reference(fmt, dtype, mode, dry):
    check(fmt, dtype, mode, SMALL_SHAPES, dry=dry)


@pytest.mark.parametrize("fmt", ["8bit", "4bit", "bf16"])
@pytest.mark.parametrize("t", [2, 1000, 10**6, (1, 2, 1000)])
def test_step_counts_dither_and_bias_regimes(fmt, t):
    """Late steps round the bias corrections to 1 (the mean's from t = 356, both from 17,321); the dither
    depends on each tensor's own t (and t = 10**6 > 2**31 / 0x9E3779B9 wraps the seed's product)."""
    check(fmt, BF16, "kahan", SHAPES2, t=t, dry=t == 1000)


@pytest.mark.parametrize("fmt", ["8bit", "bf16"])
def test_gradients_of_another_dtype(fmt):
    """float32 gradients of bfloat16 weights, float16 ones of float32 weights: widened as the reference does."""
    check(fmt, BF16, "kahan", SHAPES2, grads=F32)
    check(fmt, F32, "plain", SHAPES2, grads=F16)


def test_several_steps_evolve_the_codes_identically():
    check("4bit", BF16, "kahan", [(9, 257), (3, 5, 60)], steps=3)
    check("8bit", F16, "master", [(4097,)], steps=3, dry=True)


@pytest.mark.parametrize("hp", HYPER, ids=lambda h: ",".join(h))
@pytest.mark.parametrize("fmt,dtype,mode", [("8bit", F32, "plain"), ("4bit", BF16, "master"), ("bf16", F16, "kahan")])
def test_hyper_parameters(hp, fmt, dtype, mode):
    check(fmt, dtype, mode, SHAPES2, hp=hp)


@pytest.mark.parametrize("fmt,dtype,mode", [("8bit", BF16, "plain"), ("4bit", F32, "plain"), ("bf16", BF16, "kahan")])
@pytest.mark.parametrize("dry", [False, True])
def test_non_contiguous_weights_and_gradients(fmt, dtype, mode, dry):
    probe = make(fmt, dtype, mode, BLOCKED_SHAPES, layout="transposed")
    assert not probe.weights[0].is_contiguous() and not probe.grads[2].is_contiguous()
    check(fmt, dtype, mode, BLOCKED_SHAPES, layout="transposed", dry=dry)


@pytest.mark.parametrize("fmt,dtype,mode", [("8bit", BF16, "kahan"), ("4bit", F16, "master"), ("bf16", F32, "plain")])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("dry", [False, True])
def test_capturable_steps_read_the_device_counts_or_write_nothing(fmt, dtype, mode, skip, dry):
    """Counts, bias corrections, dither seeds and the skip flag from device tensors: the reference's capturable
    step bitwise, the counts advanced unless skipped; a skipped step leaves every tensor as it was."""
    check(fmt, dtype, mode, SHAPES2, skip=skip, dry=dry, t=(3, 1000), steps=2)


def test_capturable_without_bias_correction():
    check("4bit", BF16, "kahan", [(9, 257)], skip=False, hp={"bias_correction": False})


@pytest.mark.parametrize("fmt", ["8bit", "bf16"])
def test_whole_step_norms_and_step_sizes(fmt):
    ref, fast = make(fmt, BF16, "kahan", SHAPES2), to_device(make(fmt, BF16, "kahan", SHAPES2))
    a, b = reference.lamb_step(ref), triton_gpu.lamb_step(fast)
    torch.testing.assert_close(b.sumsq.cpu(), a.sumsq, rtol=1e-12, atol=0)
    torch.testing.assert_close(b.step_sizes.cpu(), a.step_sizes, rtol=1e-6, atol=0)
    if torch.equal(a.step_sizes, b.step_sizes.cpu()):
        assert_bitwise(host(snapshot(fast)), snapshot(ref))


def assert_bitwise_but_delegated(fast, ref, delegated):
    """Every written tensor bitwise; on a GPU not those of tensor ``delegated`` (``"[k]"``), which the reference
    stepped there with torch's CUDA kernels (its float64 arithmetic may contract into FMAs)."""
    names = [n for n, _ in snapshot(ref) if DEVICE.type == "cpu" or not n.endswith(delegated)]
    assert_bitwise([x for x in host(snapshot(fast)) if x[0] in names], [x for x in snapshot(ref) if x[0] in names])


def test_unsupported_partitions_are_delegated_to_the_reference():
    """An output of another dtype than its Kahan weight goes to the reference; the rest of the batch to Triton."""
    ref, fast = make("8bit", BF16, "kahan", [(4097,), (9, 257)]), make("8bit", BF16, "kahan", [(4097,), (9, 257)])
    for b in (ref, fast):
        b.outs = [torch.zeros(4097, dtype=F32), b.weights[1]]
    fast = to_device(fast)
    p_ref, p = reference.phase1_batch(ref), triton_gpu.phase1_batch(fast)
    assert [isinstance(x, triton_gpu._Delegated) for x in p.carry[0]] == [True, False]
    torch.testing.assert_close(p.sumsq.cpu(), p_ref.sumsq, rtol=1e-12, atol=0)
    _, sizes, _ = finish_norms(ref, p_ref.sumsq, local_reducer)
    reference.phase2_batch(ref, p_ref, sizes)
    triton_gpu.phase2_batch(fast, p, sizes.to(DEVICE))
    assert_bitwise_but_delegated(fast, ref, "[0]")
    if DEVICE.type == "cpu":
        assert torch.equal(ref.outs[0], fast.outs[0])


def test_float64_weights_are_delegated():
    """float64 parameters keep float64 moments (format "fp32" of a Kahan group): stepped by the reference."""
    def batch():
        b = make("fp32", BF16, "kahan", [(33, 17)])
        w = torch.linspace(-1, 1, 50, dtype=torch.float64)
        b.weights.append(w), b.grads.append(torch.linspace(2, -1, 50, dtype=torch.float64))  # (outs is weights)
        b.means.append(torch.zeros(50, dtype=torch.float64)), b.vars.append(torch.zeros(50, dtype=torch.float64))
        b.masters.append(None), b.comps.append(None), b.scalars.append(b.scalars[0]), b.counts.append(1)
        b.lrs = [0.01, 0.02]
        return b
    ref, fast = batch(), to_device(batch())
    p_ref, p = reference.phase1_batch(ref), triton_gpu.phase1_batch(fast)
    assert [isinstance(x, triton_gpu._Delegated) for x in p.carry[0]] == [False, True]
    _, sizes, _ = finish_norms(ref, p_ref.sumsq, local_reducer)
    reference.phase2_batch(ref, p_ref, sizes)
    triton_gpu.phase2_batch(fast, p, sizes.to(DEVICE))
    assert_bitwise_but_delegated(fast, ref, "[1]")


def _params(dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 96), (96,), (48, 100), (8, 64)]  # 8bit for the 6144- and 4800-element ones, fp32 for the rest
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.3).to(dtype).to(device)) for s in shapes]


@pytest.mark.parametrize("moments,master_weights,dtype,capturable", [
    ("8bit", "kahan", BF16, False), ("4bit", None, F16, False), ("bf16", False, BF16, True),
    ("4bit", "kahan", BF16, True)])
def test_optimizer_steps_bitwise_like_the_reference(moments, master_weights, dtype, capturable, monkeypatch):
    calls = []
    plan = triton_lean.plan_phase1
    monkeypatch.setattr(triton_lean, "plan_phase1", lambda *a, **k: calls.append(1) or plan(*a, **k))
    params = [_params(dtype, "cpu"), _params(dtype, DEVICE)]
    opts = [mplamb.Lamb(ps, lr=1e-2, weight_decay=0.01, moments=moments, master_weights=master_weights, backend=b,
                        capturable=c)
            for ps, b, c in zip(params, ("reference", "triton"), (False, capturable))]
    for i in range(3):
        g = torch.Generator().manual_seed(100 + i)
        for p, q in zip(*params):
            grad = torch.randn(p.shape, generator=g).to(dtype)
            if i == 1 and p.dim() == 1:
                grad[0] = float("inf")  # a skipped step
            p.grad, q.grad = grad, grad.to(DEVICE)
        for o in opts:
            o.step()
        for p, q in zip(*params):
            assert torch.equal(p, q.cpu()), f"step {i}"
    assert calls, "the Triton lean kernels did not run"
    assert opts[1].state[params[1][0]]["exp_avg"].dtype == codec.code_dtype(moments, "mean")  # (6144 elements)
    assert int(opts[0].skipped_steps) == int(opts[1].skipped_steps) == 1
    for p, q in zip(*params):
        a, b = opts[0].state[p], opts[1].state[q]
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k].cpu().to(a[k].dtype)), k


_COMPILE = r'''
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from mplamb.kernels import triton_gpu, triton_lean_kernels as KL

ptrs = dict(addr_ptr="*i64", num_ptr="*fp64", tid_ptr="*i32", first_ptr="*i32", rescale_ptr="*fp32",
            partial_ptr="*fp64", steps_ptr="*fp64", bias_ptr="*fp64", last_row="i64", skip_ptr="*u8", inv_n="fp32",
            inv_k="fp32", n_levels="fp32", k_levels="fp32")
flags = dict(RESCALE_FROM_PTR=True, DEVICE_T=True, SKIP_FROM_PTR=True)
blocked = dict(W_KIND=1, G_KIND=1, MODE=2, PACKED=True, B=128, NBLK=8, HALF=64, **flags)
elementwise = dict(W_KIND=2, G_KIND=2, M_KIND=1, MODE=1, BLOCK=KL.BLOCK, **flags)
for fn, consts in [(KL.phase1_blocked_kernel, dict(blocked, WRITE=True)),
                   (KL.phase2_blocked_kernel, dict(blocked, RECOMPUTE=True)),
                   (KL.phase1_elementwise_kernel, dict(elementwise, WRITE=False)),
                   (KL.phase2_elementwise_kernel, dict(elementwise, RECOMPUTE=False))]:
    signature = {n: "constexpr" if n in consts else ptrs[n] for n in fn.arg_names}
    ptx = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                         options=triton_gpu._options()).asm["ptx"]
    print(fn.__name__, len(re.findall(r"fma\.rn(\.ftz)?\.f32", ptx)), len(re.findall(r"div\.rn\.f32", ptx)),
          len(re.findall(r"sqrt\.rn\.f32", ptx)), len(re.findall(r"(div|sqrt)\.(approx|full)", ptx)))
'''


def test_kernels_compile_for_an_nvidia_gpu_without_float32_fma():
    """The kernels compiled ahead of time for sm_90 (no GPU needed; the interpreter never compiles): the PTX holds
    no float32 fused multiply-add (the launcher's ``enable_fp_fusion=False``), and only IEEE division and square
    root.  (float64 FMAs are the bias correction's exact division, :func:`.triton_kernels.divide_in_float64`.)"""
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(sys.path))
    run = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines()]
    assert len(rows) == 4, run.stdout
    for name, fma32, div_rn, sqrt_rn, approx in rows:
        assert (int(fma32), int(approx)) == (0, 0) and int(div_rn) > 0 and int(sqrt_rn) > 0, name
