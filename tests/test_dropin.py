"""``mplamb.Lamb`` follows torch.optim's conventions, so that the tools built on them work.

Named parameters, torch's keyword arguments (``foreach``, ``fused``, ``maximize``, ``capturable``,
``differentiable``), step counts kept as tensors, deep copies and pickles that go on stepping,
the skip counter inside what ``torch.distributed.checkpoint`` carries, torch's wording for a bad
tensor lr, a failing step that leaves no state behind, and no change to process-wide settings
(the thread count) in a fresh process.  The real frameworks are driven in
``test_integrations.py``.
"""
from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import mplamb
from mplamb.kernels import available_backends


def model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(dtype)


def train(m, opt, steps=3, seed=1, nan_at=()):
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        x = torch.randn(8, 6, generator=g).to(next(m.parameters()).dtype)
        opt.zero_grad()
        m(x).float().pow(2).mean().backward()
        if i in nan_at:
            next(m.parameters()).grad.view(-1)[0] = float("nan")
        opt.step()
    return [p.detach().clone() for p in m.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_named_parameters_and_named_groups_train_like_plain_ones():
    plain = train(m := model(), mplamb.Lamb(m.parameters(), lr=0.01))
    named_opt = mplamb.Lamb((n := model()).named_parameters(), lr=0.01)
    assert same(plain, train(n, named_opt))
    sd = named_opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == [k for k, _ in n.named_parameters()]
    # named into unnamed and back (torch >= 2.6 moves state between them)
    unnamed = mplamb.Lamb(model().parameters(), lr=0.01)
    unnamed.load_state_dict(sd)
    named_again = mplamb.Lamb(model().named_parameters(), lr=0.01)
    named_again.load_state_dict(unnamed.state_dict())
    groups = [{"params": [(k, p) for k, p in m.named_parameters() if k.endswith("weight")], "weight_decay": 0.1},
              {"params": [(k, p) for k, p in m.named_parameters() if k.endswith("bias")], "weight_decay": 0.0}]
    assert mplamb.Lamb(groups).param_groups[1]["param_names"] == ["0.bias", "2.bias"]
    with pytest.raises(TypeError, match="params: expected floating-point tensors"):
        mplamb.Lamb([("w", "not a tensor")])


def test_add_param_group_takes_a_generator():
    m = model()
    opt = mplamb.Lamb(m[0].parameters())
    opt.add_param_group({"params": m[2].parameters(), "lr": 0.1})
    assert len(opt.param_groups[1]["params"]) == 2


def test_maximize_is_exactly_descent_on_the_negated_loss():
    up = model()
    a = train(up, mplamb.Lamb(up.parameters(), lr=0.01, weight_decay=0.01, maximize=True, max_grad_norm=0.5))

    down = model()
    opt = mplamb.Lamb(down.parameters(), lr=0.01, weight_decay=0.01, max_grad_norm=0.5)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, 6, generator=g)
        opt.zero_grad()
        (-down(x).float().pow(2).mean()).backward()
        opt.step()
    assert same(a, [p.detach() for p in down.parameters()])


@pytest.mark.parametrize("kw,backend", [(dict(foreach=True), "foreach"), (dict(fused=True), "fused_cpu"),
                                        (dict(fused=False), "reference"), (dict(foreach=False), None)])
def test_foreach_and_fused_pick_backends(kw, backend, monkeypatch):
    if backend == "fused_cpu" and "fused_cpu" not in available_backends("cpu"):
        pytest.skip("numba not installed")
    seen = []
    from mplamb import optimizer as optimizer_module

    real = optimizer_module.get_backend
    monkeypatch.setattr(optimizer_module, "get_backend", lambda name, device: seen.append(name) or real(name, device))
    m = model()
    train(m, mplamb.Lamb(m.parameters(), **kw), steps=1)
    assert seen == [backend or ("fused_cpu" if "fused_cpu" in available_backends("cpu") else "reference")]


def test_keyword_errors_in_torch_wording():
    ps = model().parameters
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together."):
        mplamb.Lamb(ps(), fused=True, foreach=True)
    with pytest.raises(RuntimeError, match="differentiable=True is not supported"):
        mplamb.Lamb(ps(), differentiable=True)
    with pytest.raises(ValueError, match="fused=True: conflicts with backend='reference'"):
        mplamb.Lamb(ps(), fused=True, backend="reference")
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        mplamb.Lamb(ps(), lr=torch.tensor([0.1, 0.2]))
    with pytest.raises(TypeError, match="maximize: expected a bool"):
        mplamb.Lamb(ps(), maximize=1)


def test_step_counts_are_float32_tensors_like_torch():
    m = model()
    opt = mplamb.Lamb(m.parameters())
    train(m, opt, steps=2)
    ref = torch.optim.AdamW(model().parameters())
    train(model(), ref, steps=1)
    for st, rst in zip(opt.state.values(), ref.state.values()):
        assert st["step"].dtype == rst["step"].dtype == torch.float32 and st["step"].device == rst["step"].device
        assert float(st["step"]) == 2


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_go_on_stepping_like_the_original(how):
    """A model and its optimizer copied together (deepcopy or one pickle): the copy trains on bitwise as
    the original, skip counter included."""
    m = model(torch.bfloat16)
    opt = mplamb.Lamb(m.parameters(), lr=0.01, weight_decay=0.01, max_grad_norm=1.0)
    train(m, opt, steps=3, nan_at=(1,))
    twin_m, twin = copy.deepcopy((m, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((m, opt)))
    assert twin.skipped_steps == 1 and twin.process_group is None and twin.param_groups[0]["maximize"] is False
    a = train(m, opt, steps=2, seed=7, nan_at=(0,))
    b = train(twin_m, twin, steps=2, seed=7, nan_at=(0,))
    assert same(a, b) and int(opt.skipped_steps) == int(twin.skipped_steps) == 2
    assert twin.state_dict()["param_groups"][0]["skipped_steps"] == 2


def test_pickling_a_process_group_is_refused_with_the_fix():
    opt = mplamb.Lamb(model().parameters(), process_group=object())
    with pytest.raises(TypeError, match="a process group cannot be pickled; pickle opt.state_dict"):
        pickle.dumps(opt)
    assert copy.deepcopy(opt).process_group is opt.process_group  # a deep copy shares it


def test_skipped_steps_travel_inside_state_and_param_groups():
    """torch.distributed.checkpoint's get/set_optimizer_state_dict carry only those two."""
    m = model()
    opt = mplamb.Lamb(m.parameters())
    train(m, opt, steps=3, nan_at=(0, 2))
    sd = opt.state_dict()
    carried = {"state": sd["state"], "param_groups": sd["param_groups"]}
    other = mplamb.Lamb(model().parameters())
    other.load_state_dict(copy.deepcopy(carried))
    assert other.skipped_steps == 2 and other.param_groups[0]["skipped_steps"] == 2


def test_skipped_steps_survive_dcp_state_dict_helpers():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    m = model()
    opt = mplamb.Lamb(m.parameters())
    train(m, opt, steps=3, nan_at=(1,))
    sd = get_optimizer_state_dict(m, opt)
    m2 = model()
    opt2 = mplamb.Lamb(m2.parameters())
    set_optimizer_state_dict(m2, opt2, optim_state_dict=sd)
    assert opt2.skipped_steps == 1


def test_a_failing_step_leaves_no_state_and_meta_is_refused():
    m = model()
    opt = mplamb.Lamb(m.parameters(), backend="reference")
    train(m, opt, steps=1)
    new = torch.nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [new]})
    new.grad = torch.randn(3)
    before = {p: {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()}
    from mplamb.kernels import reference

    def boom(*args, **kwargs):
        raise RuntimeError("kernel failed")

    real = reference.phase1_batch
    reference.phase1_batch = boom
    try:
        with pytest.raises(RuntimeError, match="kernel failed"):
            opt.step()
    finally:
        reference.phase1_batch = real
    assert new not in opt.state and set(opt.state) == set(before)
    meta = torch.nn.Linear(3, 3, device="meta")
    opt = mplamb.Lamb(meta.parameters())
    for p in meta.parameters():
        p.grad = torch.empty_like(p)
    with pytest.raises(RuntimeError, match="meta device"):
        opt.step()
    assert not opt.state


@pytest.mark.skipif("fused_cpu" not in available_backends("cpu"), reason="numba not installed")
@pytest.mark.parametrize("how", ["set_num_threads", "OMP_NUM_THREADS"])
def test_fused_step_leaves_torch_thread_count_alone(how):
    """numba's OpenMP pool starts on the first fused step and used to set the process-wide count."""
    code = textwrap.dedent(f"""
        import torch, mplamb
        if {how == "set_num_threads"}:
            torch.set_num_threads(1)
        before = torch.get_num_threads()
        m = torch.nn.Linear(64, 64)
        opt = mplamb.Lamb(m.parameters(), backend="fused_cpu")
        for _ in range(2):
            m(torch.randn(4, 64)).sum().backward()
            opt.step()
        print(before, torch.get_num_threads())
    """)
    env = dict(os.environ, **({"OMP_NUM_THREADS": "1"} if how == "OMP_NUM_THREADS" else {}))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.split()
    assert before == after == "1"


def test_param_groups_honour_timm_no_weight_decay():
    class ViTLike(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 5, 4))
            self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
            self.rel = torch.nn.Module()
            self.rel.relative_position_bias_table = torch.nn.Parameter(torch.zeros(9, 2))
            self.proj = torch.nn.Linear(4, 4)

        def no_weight_decay(self):
            return {"pos_embed", "cls_token"}

        def no_weight_decay_keywords(self):
            return {"relative_position_bias_table"}

    decay, no_decay = mplamb.param_groups(ViTLike(), weight_decay=0.05)
    assert len(decay["params"]) == 1 and decay["params"][0].shape == (4, 4)
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_param_groups_of_a_real_timm_vit():
    timm = pytest.importorskip("timm")
    try:
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    except Exception as e:  # timm without its optional dependencies (torchvision)
        pytest.skip(f"timm cannot build a ViT here: {type(e).__name__}")
    decay, no_decay = mplamb.param_groups(vit, weight_decay=0.05)
    ids = {id(p) for p in no_decay["params"]}
    assert id(vit.pos_embed) in ids and id(vit.cls_token) in ids
    assert all(p.ndim > 1 for p in decay["params"])


def test_auto_warns_once_when_it_cannot_take_the_fast_backend(monkeypatch):
    from mplamb import kernels

    monkeypatch.setattr(kernels, "_warned", set())
    real = kernels._runs_on
    monkeypatch.setattr(kernels, "_runs_on", lambda name, dev: name != "fused_cpu" and real(name, dev))
    m = model()
    with pytest.warns(RuntimeWarning, match="uses 'reference', many times slower than 'fused_cpu', which needs numba"):
        train(m, mplamb.Lamb(m.parameters()), steps=1)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(m, mplamb.Lamb(m.parameters()), steps=1)  # once per process and device type
        train(m, mplamb.Lamb(m.parameters(), fused=False), steps=1)  # asked for: no warning
