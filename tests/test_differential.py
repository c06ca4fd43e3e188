"""Every backend against the reference backend through ``mplamb.Lamb``, on drawn configurations.

Hypothesis draws whole optimizers: one to three param groups of mixed dtypes (fp32, bf16 and
fp16 with or without masters, fp64) and shapes (0-d, empty, one element, odd, 2-D with
transposed gradients, a few chunks long), each group with its own options (weight decay, bias
correction, grad averaging, element clipping, rescale, trust-ratio bounds and cap, no layer
adaptation, betas, eps, lr), and on top global-norm clipping, a loss scale handed over as
GradScaler hands it, steps started at t = 1 or just before the points where the kernels stop
dividing by a bias correction (t = 356 and 17,321), and gradients of very different scales, some
with an inf or NaN (the whole step is skipped).

The rule compared after every step: when the backend's norms (``last_step_stats`` and the global
gradient norm) are bit-identical to the reference's, its weights, masters, moments and step
counts must be bit-identical too.  When they are not (another summation order of the float64
sums of squares, usual for float64 tensors and rare otherwise), every tensor must agree within
the accumulated effect of that last-bit difference: 1e-10 (float64), 2**-19 (float32) or one
rounding step (2**-7, bf16/fp16) relative to the tensor's largest magnitude.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mplamb
from mplamb.kernels import available_backends

OTHERS = [b for b in available_backends("cpu") if b != "reference"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
RTOL = {torch.float64: 1e-10, torch.float32: 2.0 ** -19, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -7}

shapes = st.one_of(st.just(()), st.just((0,)), st.just((1,)), st.tuples(st.integers(2, 3000)),
                   st.tuples(st.integers(2, 40), st.integers(2, 40)), st.tuples(st.integers(9000, 20000)))

group_options = st.fixed_dictionaries({}, optional={
    "lr": st.sampled_from([1e-2, 0.3]),
    "weight_decay": st.sampled_from([0.0, 0.01, 0.1]),
    "bias_correction": st.just(False),
    "grad_averaging": st.just(False),
    "clip_gradient": st.sampled_from([1e-3, 0.5, 10.0]),
    "rescale_grad": st.sampled_from([0.5, 1 / 1024]),
    "lower_bound": st.sampled_from([1e-3, 0.5]),
    "upper_bound": st.sampled_from([1.0, 10.0]),
    "max_trust_ratio": st.sampled_from([0.5, 10.0]),
    "layer_adaptation": st.just(False),
    "master_weights": st.booleans(),
    "betas": st.tuples(st.sampled_from([0.0, 0.5, 0.9]), st.sampled_from([0.0, 0.99, 0.999])),
    "eps": st.sampled_from([1e-8, 1e-3]),
})

params_spec = st.lists(st.tuples(st.sampled_from(DTYPES), shapes, st.sampled_from([0.0, 1e-3, 1.0, 30.0])),
                       min_size=1, max_size=4)
configs = st.fixed_dictionaries({
    "groups": st.lists(st.tuples(params_spec, group_options), min_size=1, max_size=3),
    "max_grad_norm": st.sampled_from([None, None, 1e-3, 1.0]),
    "start": st.sampled_from([1, 1, 355, 17320]),
    "steps": st.integers(1, 3),
    "seed": st.integers(0, 2 ** 16),
    "grad_scale": st.sampled_from([1e-4, 1.0, 100.0]),
    "bad_step": st.sampled_from([None, None, None, 0, 1]),
    "bad_value": st.sampled_from([math.inf, -math.inf, math.nan]),
    "transposed": st.booleans(),
    "loss_scale": st.sampled_from([None, None, 1024.0, 0.125]),
})


def _gradients(cfg: Dict[str, Any], shapes_: List[tuple]) -> List[List[torch.Tensor]]:
    """float64 gradients per step (one list per step), an inf/NaN planted at ``bad_step``."""
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    out = []
    for step in range(cfg["steps"]):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) * cfg["grad_scale"] for s in shapes_]
        if step == cfg["bad_step"]:
            target = next((x for x in grads if x.numel()), None)
            if target is not None:
                target.view(-1)[target.numel() // 2] = cfg["bad_value"]
        out.append(grads)
    return out


def _run(backend: str, cfg: Dict[str, Any]) -> List[Tuple[list, Dict[str, torch.Tensor]]]:
    """Per step: (the norms the step reported, every parameter and state tensor after it)."""
    g = torch.Generator().manual_seed(cfg["seed"])
    groups, params = [], []
    for spec, options in cfg["groups"]:
        ps = [torch.nn.Parameter((torch.randn(s, generator=g, dtype=torch.float64) * scale).to(dt))
              for dt, s, scale in spec]
        groups.append({"params": ps, **options})
        params += ps
    opt = mplamb.Lamb(groups, backend=backend, max_grad_norm=cfg["max_grad_norm"])
    if cfg["start"] > 1:  # every parameter's step count jumps to start - 1 after a first step
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        for p in params:
            opt.state[p]["step"] = cfg["start"] - 1
    record = []
    for grads in _gradients(cfg, [tuple(p.shape) for p in params]):
        scale = cfg["loss_scale"]
        for p, x in zip(params, grads):
            x = (x if scale is None else x * scale).to(p.dtype)
            p.grad = x.t().contiguous().t() if cfg["transposed"] and x.dim() == 2 else x  # same values, strided
        if scale is not None:  # as GradScaler.step hands them over (Lamb._step_supports_amp_scaling)
            opt.grad_scale = torch.tensor(scale)
            opt.found_inf = torch.tensor(0.0)
        opt.step()
        if scale is not None:
            del opt.grad_scale, opt.found_inf
        stats = opt.last_step_stats()
        norms = [opt.skipped_steps, opt.last_grad_norm] + [stats[k] for k in ("weight_norm", "update_norm")]
        tensors = {}
        for i, p in enumerate(params):
            tensors[f"param {i}"] = p.detach().clone()
            for key, value in opt.state[p].items():
                tensors[f"param {i} {key}"] = value.clone() if torch.is_tensor(value) else torch.tensor(value)
        record.append((norms, tensors))
    return record


def _bitwise(a: Any, b: Any) -> bool:
    if a is None or b is None or not torch.is_tensor(a):
        return a == b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def _close(got: torch.Tensor, ref: torch.Tensor) -> bool:
    if not got.is_floating_point() or not got.numel():
        return _bitwise(got, ref)
    g, r = got.double(), ref.double()
    same_nan = torch.equal(torch.isnan(g), torch.isnan(r))
    g, r = g.nan_to_num(0.0), r.nan_to_num(0.0)
    scale = float(r.abs().max())
    return same_nan and float((g - r).abs().max()) <= RTOL[got.dtype] * scale


@pytest.mark.parametrize("backend", OTHERS)
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(cfg=configs)
def test_backend_steps_like_the_reference(backend, cfg):
    ref, got = _run("reference", cfg), _run(backend, cfg)
    for step, ((ref_norms, ref_tensors), (got_norms, got_tensors)) in enumerate(zip(ref, got)):
        assert got_norms[0] == ref_norms[0], f"step {step}: skipped steps differ"
        exact = all(_bitwise(a, b) for a, b in zip(got_norms, ref_norms))
        for name, r in ref_tensors.items():
            ok = _bitwise(got_tensors[name], r) if exact else _close(got_tensors[name], r)
            assert ok, f"step {step}, {name} ({'bitwise' if exact else 'within tolerance'})"
