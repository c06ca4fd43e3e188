"""MXNet parity of mplamb.Lamb on the end-to-end golden cases (``e2e_*``).

MXNet's ``mx.optimizer.LAMB``: 3 parameters, 5 steps, float32 and float16
multi-precision, with bounds, clipping, rescale, no bias correction and lr/wd
multipliers (expressed here as one param group per parameter).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mplamb
from golden_cases import all_cases, load, nrel, steprel, ulp_distance

E2E = [c.name for c in all_cases() if c.kind == "e2e"]


def _lamb_kwargs(hyper: dict) -> dict:
    kw = {}
    if "beta1" in hyper or "beta2" in hyper:
        kw["betas"] = (hyper.get("beta1", 0.9), hyper.get("beta2", 0.999))
    for mx_name, name in (("epsilon", "eps"), ("bias_correction", "bias_correction"),
                          ("clip_gradient", "clip_gradient"), ("rescale_grad", "rescale_grad"),
                          ("lower_bound", "lower_bound"), ("upper_bound", "upper_bound")):
        if mx_name in hyper:
            kw[name] = hyper[mx_name]
    return kw


def _replay(case):
    meta = case.meta
    n = meta["nparams"]
    dtype = {"float32": torch.float32, "float16": torch.float16}[meta["dtype"]]
    params = [torch.nn.Parameter(case.tensor(f"init__w{i}")) for i in range(n)]
    groups = [{"params": [p], "lr": meta["effective_lr"][i], "weight_decay": meta["effective_wd"][i]}
              for i, p in enumerate(params)]
    opt = mplamb.Lamb(groups, master_weights=bool(meta["hyper"].get("multi_precision", False)),
                      **_lamb_kwargs(meta["hyper"]))
    assert all(p.dtype == dtype for p in params)
    history = []
    for s in range(meta["nsteps"]):
        before = [p.detach().clone() for p in params]
        before32 = [opt.state[p]["master_weight"].clone() if "master_weight" in opt.state[p] else None for p in params]
        for i, p in enumerate(params):
            p.grad = case.tensor(f"step{s}__grad{i}")
        opt.step()
        history.append((before, before32, [p.detach().clone() for p in params],
                        [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
                         for p in params]))
    return history


@pytest.mark.parametrize("name", E2E)
def test_lamb_matches_mxnet_end_to_end(name):
    case = load(name)
    meta = case.meta
    if meta["mode"] == "direct" and meta["hyper"].get("multi_precision"):
        # MXNet's per-parameter route (update_multi_precision -> mp_lamb_update_phase2) never
        # writes weight32 (deviation D4): its master weights stay at their initial value while the
        # float16 weights move, so each step restarts from the initial master.  That is a bug, not
        # a behaviour to match; the recording demonstrates it, and mplamb updates its masters.
        w32_init = case.arrays["init__w0"].astype(np.float32)
        assert np.array_equal(case.arrays[f"step{meta['nsteps'] - 1}__w32_0"], w32_init)
        history = _replay(case)
        final32 = history[-1][3][0]["master_weight"].numpy()
        assert not np.array_equal(final32, w32_init)  # mplamb's masters do move
        return
    history = _replay(case)
    mp = bool(meta["hyper"].get("multi_precision"))
    f16_nomp = meta["dtype"] == "float16" and not mp
    for s, (before, before32, after, states) in enumerate(history):
        for i in range(meta["nparams"]):
            w_exp = case.arrays[f"step{s}__w{i}"]
            if f16_nomp:
                # sanity only: MXNet computes in float16 throughout (D6)
                assert nrel(after[i], w_exp) <= 0.2, (s, i)
                continue
            assert nrel(states[i]["exp_avg"], case.arrays[f"step{s}__mean{i}"]) <= 1e-6, (s, i)
            assert nrel(states[i]["exp_avg_sq"], case.arrays[f"step{s}__var{i}"]) <= 1e-6, (s, i)
            if not mp:
                prev = case.arrays[f"step{s - 1}__w{i}"] if s else case.arrays[f"init__w{i}"]
                assert steprel(after[i], w_exp, prev) <= 1e-3, (s, i)
                assert nrel(after[i], w_exp) <= 1e-6, (s, i)
                continue
            w32_exp = case.arrays[f"step{s}__w32_{i}"]
            prev32 = case.arrays[f"step{s - 1}__w32_{i}"] if s else case.arrays[f"init__w{i}"].astype(np.float32)
            w32 = states[i]["master_weight"]
            assert steprel(w32, w32_exp, prev32) <= 5e-3, (s, i)
            assert nrel(w32, w32_exp) <= 1e-4, (s, i)
            assert ulp_distance(after[i], w_exp) <= 4, (s, i)
