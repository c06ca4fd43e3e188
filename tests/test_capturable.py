"""Capturable steps (``Lamb(capturable=True)``): no host synchronisation, the same results.

The Triton backend runs here through ``TRITON_INTERPRET=1`` on CPU tensors, so the property that
matters on a GPU — ``step()`` never waits for the device — is checked on every machine: a
``TorchDispatchMode`` counts ``aten._local_scalar_dense`` (what ``.item()``, ``bool()`` and
``float()`` of a tensor dispatch to) during ``step()`` and requires none, with global-norm
clipping, a GradScaler, an lr scheduler filling a tensor lr, and an inf gradient (a skipped
step).  Results are bitwise those of the host-decided step (``capturable=False``), on every
capturable backend.  The CUDA-graph capture itself is tested in ``test_cuda.py`` (GPU only).
"""
from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mplamb
from mplamb.kernels import available_backends

CAPTURABLE = [b for b in ("reference", "triton") if b in available_backends("cpu")]


class CountOps(TorchDispatchMode):
    """Counts every aten op dispatched inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> int:
        return self.ops["aten._local_scalar_dense.default"]


def model(dtype: torch.dtype, layers: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(7, 7) for _ in range(layers)]).to(dtype)


def train(capturable, backend, *, dtype=torch.bfloat16, steps=5, inf_at=(2,), scaler=False, sched=False,
          counter=None, layers=2, **kw):
    """A few steps of a tiny model; returns (params, optimizer, per-step sync counts)."""
    m = model(dtype, layers)
    lr = torch.tensor(0.02, dtype=torch.float64) if sched else 0.02
    opt = mplamb.Lamb(m.parameters(), lr=lr, weight_decay=0.01, backend=backend, capturable=capturable, **kw)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1)) if sched else None
    gs = torch.amp.GradScaler("cpu", init_scale=256.0) if scaler else None
    data = torch.Generator().manual_seed(1)
    syncs = []
    for i in range(steps):
        x = torch.randn(4, 7, generator=data).to(dtype)
        loss = m(x).float().pow(2).mean()
        opt.zero_grad()
        (gs.scale(loss) if gs else loss).backward()
        if i in inf_at:
            m[0].weight.grad[0, 0] = float("inf")
        with CountOps() as c:
            gs.step(opt) if gs else opt.step()
        syncs.append(c.syncs)
        if counter is not None:
            counter.append(c.ops)
        if gs:
            gs.update()
        if schedule:
            schedule.step()
    return [p.detach().clone() for p in m.parameters()], opt, syncs


def assert_same_state(a: mplamb.Lamb, b: mplamb.Lamb) -> None:
    for (pa, sa), (pb, sb) in zip(a.state.items(), b.state.items()):
        assert int(sa["step"]) == int(sb["step"])
        for k in ("exp_avg", "exp_avg_sq", "master_weight"):
            if k in sa:
                assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("backend", CAPTURABLE)
@pytest.mark.parametrize("options", [dict(), dict(max_grad_norm=0.05), dict(scaler=True, max_grad_norm=1.0),
                                     dict(sched=True), dict(scaler=True, sched=True, max_grad_norm=0.05)],
                         ids=["plain", "clip", "scaler+clip", "scheduler", "all"])
def test_capturable_step_makes_no_host_sync(backend, options):
    _, _, host = train(False, backend, **options)
    assert all(n >= 1 for n in host)  # the host-decided step does wait: the counter sees it
    _, opt, dev = train(True, backend, **options)
    assert dev == [0] * len(dev)
    assert isinstance(opt.skipped_steps, torch.Tensor) and int(opt.skipped_steps) == 1


DTYPES = [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None), (torch.bfloat16, False),
          (torch.float64, None)]


@pytest.mark.parametrize("backend", CAPTURABLE)
@pytest.mark.parametrize("dtype,master", DTYPES, ids=["fp32", "bf16", "fp16", "bf16-nomaster", "fp64"])
@pytest.mark.parametrize("options", [dict(), dict(max_grad_norm=0.05, sched=True),
                                     dict(bias_correction=False, layer_adaptation=False),
                                     dict(betas=(0.5, 0.6), max_trust_ratio=2.0, lower_bound=0.1, upper_bound=5.0)],
                         ids=["default", "clip+sched", "nobias-noadapt", "betas-bounds"])
def test_capturable_matches_the_host_decided_step(backend, dtype, master, options):
    a, oa, _ = train(False, backend, dtype=dtype, master_weights=master, steps=6, inf_at=(0, 3), **options)
    b, ob, _ = train(True, backend, dtype=dtype, master_weights=master, steps=6, inf_at=(0, 3), **options)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert_same_state(oa, ob)
    assert int(oa.skipped_steps) == int(ob.skipped_steps) == 2
    assert torch.equal(oa.last_grad_norm, ob.last_grad_norm)
    for k, v in oa.last_step_stats().items():
        if k != "params":
            assert torch.equal(v, ob.last_step_stats()[k]), k


def test_capturable_step_counts_are_device_tensors_and_survive_a_state_dict():
    _, opt, _ = train(True, "reference", steps=3, inf_at=())
    st = next(iter(opt.state.values()))
    assert isinstance(st["step"], torch.Tensor) and st["step"].dtype == torch.float32 and float(st["step"]) == 3
    sd = copy.deepcopy(opt.state_dict())
    assert sd["mplamb"]["skipped_steps"] == 0
    # a capturable state goes on in a host-decided optimizer and back, bitwise as if uninterrupted
    full, _, _ = train(False, "reference", steps=5, inf_at=())
    m = model(torch.bfloat16)
    for p, q in zip(m.parameters(), opt.param_groups[0]["params"]):
        p.data.copy_(q)
    host = mplamb.Lamb(m.parameters(), lr=0.02, weight_decay=0.01, backend="reference", capturable=False)
    host.load_state_dict(sd)
    data = torch.Generator().manual_seed(1)
    for i in range(5):
        x = torch.randn(4, 7, generator=data).to(torch.bfloat16)
        if i < 3:
            continue
        host.zero_grad()
        m(x).float().pow(2).mean().backward()
        host.step()
        if i == 3:  # and back into a capturable one
            again = mplamb.Lamb(m.parameters(), lr=0.02, weight_decay=0.01, backend="reference", capturable=True)
            again.load_state_dict(host.state_dict())
            host = again
    for x, y in zip(full, m.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend", CAPTURABLE)
def test_work_per_step_does_not_grow_with_the_number_of_parameters(backend, monkeypatch):
    """Steady-state steps dispatch the same aten ops (and, for triton, the same kernel launches) for 4
    parameters as for 40: everything per tensor is in the kernels' tables."""
    launches = collections.Counter()
    if backend == "triton":
        from mplamb.kernels import triton_gpu

        class Counting:
            def __init__(self, kernels):
                self.kernels = kernels

            def __getattr__(self, name):
                kernel = getattr(self.kernels, name)

                class Launch:
                    def __getitem__(self, grid):
                        launches[name] += 1
                        return kernel[grid]
                return Launch()
        monkeypatch.setattr(triton_gpu, "K", Counting(triton_gpu.K))
    per_size = {}
    for layers in (2, 20):
        ops = []
        launches.clear()
        train(True, backend, layers=layers, steps=3, inf_at=(), counter=ops, max_grad_norm=0.05)
        per_size[layers] = (ops[-1], dict(launches))
    if backend == "triton":
        assert per_size[2] == per_size[20]
    else:  # the reference is plain per-tensor PyTorch: only the triton backend is launch-bound
        assert sum(per_size[20][0].values()) > sum(per_size[2][0].values())


def test_capturable_needs_a_capturable_backend():
    m = model(torch.float32)
    opt = mplamb.Lamb(m.parameters(), backend="foreach", capturable=True)
    m(torch.randn(2, 7)).sum().backward()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(ValueError, match="capturable=True: backend 'foreach'"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before)) and not opt.state
    with pytest.raises(TypeError, match="capturable: expected None or a bool"):
        mplamb.Lamb(m.parameters(), capturable="yes")
    # the default on the CPU: host-decided (step counts on the CPU, as torch keeps them), whatever the backend
    opt = mplamb.Lamb(m.parameters(), backend="foreach")
    opt.step()
    assert next(iter(opt.state.values()))["step"].device.type == "cpu"


def test_deepcopy_keeps_a_working_optimizer():
    _, opt, _ = train(True, "reference", steps=2, inf_at=())
    twin = copy.deepcopy(opt)
    assert int(twin.skipped_steps) == 0 and twin.param_groups[0]["capturable"] is True
