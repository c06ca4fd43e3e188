"""mplamb.Lamb against the independent float64 model (lamb_model.py), on every backend.

Tolerances: float32 parameters match the float64 model within 2e-5 relative per step
over 6 steps (float32 arithmetic against float64); bf16/fp16 parameters are compared
through their fp32 master weights with the same tolerance, and the parameter must be
exactly the rounding of its master.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

import mplamb
from mplamb.kernels import available_backends
from lamb_model import LambModel

BACKENDS = available_backends("cpu")
SHAPES = [(7, 5), (13,), (1,), (3, 1, 4), ()]

OPTIONS = {
    "defaults": {},
    "weight_decay": {"weight_decay": 0.05},
    "no_bias_correction": {"bias_correction": False, "weight_decay": 0.01},
    "no_grad_averaging": {"grad_averaging": False},
    "max_grad_norm": {"max_grad_norm": 0.5},
    "clip_gradient": {"clip_gradient": 0.3},
    "rescale_grad": {"rescale_grad": 0.25},
    "bounds": {"lower_bound": 0.5, "upper_bound": 1.5},
    "max_trust_ratio": {"max_trust_ratio": 0.8},
    "no_layer_adaptation": {"layer_adaptation": False},
    "betas_eps": {"betas": (0.8, 0.99), "eps": 1e-3},
    "everything": {"weight_decay": 0.02, "max_grad_norm": 1.0, "clip_gradient": 0.5, "rescale_grad": 0.5,
                   "lower_bound": 0.1, "upper_bound": 10.0, "max_trust_ratio": 5.0},
}


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.5).to(dtype)) for s in SHAPES]


def grads_for(params, step, seed=0):
    g = torch.Generator().manual_seed(1000 * step + seed)
    return [(torch.randn(p.shape, generator=g) * (step + 1)).to(p.dtype) for p in params]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if a.numel() else 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_lamb_matches_float64_model(backend, option, dtype):
    kw = dict(lr=0.05, **OPTIONS[option])
    params = make_params(dtype)
    opt = mplamb.Lamb(params, backend=backend, **kw)
    model = LambModel([p.detach().float() if dtype != torch.float64 else p for p in params], **kw)
    if dtype in (torch.bfloat16, torch.float16):
        # the model starts from the same fp32 master the optimizer creates
        model.w = [p.detach().to(torch.float32).double() for p in params]
    tol = 1e-6 if dtype == torch.float64 else 2e-5  # hyper-parameters are float32 values (MXNet rule)
    for step in range(6):
        grads = grads_for(params, step)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        model.step([g for g in grads])
        for i, p in enumerate(params):
            st = opt.state[p]
            ref = st["master_weight"] if dtype in (torch.bfloat16, torch.float16) else p
            assert rel(ref.detach(), model.w[i]) <= tol, (option, step, i)
            assert rel(st["exp_avg"], model.m[i]) <= 2e-5  # float32 betas vs exact ones, with cancellation
            assert int(st["step"]) == step + 1
            if dtype in (torch.bfloat16, torch.float16):
                assert torch.equal(p.detach(), st["master_weight"].to(dtype))
                assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_with_reference(backend):
    """Every backend gives the reference's results within 1e-6 (fp32) on mixed sizes and dtypes."""
    runs = {}
    for name in ("reference", backend):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(0,), (1,), (17, 3), (1000,), (33, 33)]]
        params += [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in [(5,), (64, 3)]]
        opt = mplamb.Lamb(params, lr=0.01, weight_decay=0.01, backend=name)
        for step in range(3):
            for p, g in zip(params, grads_for(params, step)):
                p.grad = g.t() if g.ndim == 2 and g.shape[0] == g.shape[1] else g  # non-contiguous grads too
            opt.step()
        runs[name] = [p.detach().double() for p in params]
    for a, b in zip(runs["reference"], runs[backend]):
        assert rel(b, a) <= 1e-6


def test_master_weights_false_updates_half_weight_directly():
    p = torch.nn.Parameter(torch.randn(10).to(torch.bfloat16))
    opt = mplamb.Lamb([p], lr=0.1, master_weights=False)
    p.grad = torch.randn(10).to(torch.bfloat16)
    before = p.detach().clone()
    opt.step()
    assert "master_weight" not in opt.state[p]
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert not torch.equal(p.detach(), before)


def test_fp32_params_have_no_master_copy():
    p = torch.nn.Parameter(torch.randn(10))
    opt = mplamb.Lamb([p], lr=0.1, master_weights=True)
    p.grad = torch.randn(10)
    opt.step()
    assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}


def test_layer_adaptation_false_is_plain_lr():
    p = torch.nn.Parameter(torch.randn(10) * 100)
    opt = mplamb.Lamb([p], lr=0.1, layer_adaptation=False)
    p.grad = torch.randn(10)
    opt.step()
    stats = opt.last_step_stats()
    assert float(stats["trust_ratio"][0]) == 1.0
    assert float(stats["step_size"][0]) == pytest.approx(0.1, rel=1e-7)


# ------------------------------------------------------------------ non-finite gradients

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_gradient_skips_whole_step_bitwise(bad, dtype):
    params = make_params(dtype)
    opt = mplamb.Lamb(params, lr=0.1, weight_decay=0.01, max_grad_norm=1.0, clip_gradient=0.5)
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()
    snap_p = [p.detach().clone() for p in params]
    snap_s = copy.deepcopy(opt.state_dict()["state"])
    grads = grads_for(params, 1)
    grads[2].view(-1)[0] = bad  # one element of one parameter
    for p, g in zip(params, grads):
        p.grad = g
    opt.step()
    assert opt.skipped_steps == 1
    for p, s in zip(params, snap_p):
        assert torch.equal(p.detach().reshape(-1).view(torch.uint8), s.reshape(-1).view(torch.uint8))
    for k, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            assert (torch.equal(v, snap_s[k][name]) if isinstance(v, torch.Tensor) else v == snap_s[k][name]), name


def test_huge_but_finite_gradients_are_not_skipped():
    """float64 accumulation: squares of the largest float32 values do not overflow the check."""
    p = torch.nn.Parameter(torch.ones(4))
    opt = mplamb.Lamb([p], lr=0.1)
    p.grad = torch.full((4,), 3e38)
    opt.step()
    assert opt.skipped_steps == 0


# ------------------------------------------------------------------ loss scaling

def _tiny_problem(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)).to(dtype)
    x = torch.randn(32, 8).to(dtype)
    y = torch.randn(32, 1).to(dtype)
    return model, x, y


@pytest.mark.parametrize("max_grad_norm", [None, 0.1])
def test_grad_scaler_matches_unscaled_training_bitwise(max_grad_norm):
    runs = []
    for use_scaler in (False, True):
        model, x, y = _tiny_problem()
        opt = mplamb.Lamb(model.parameters(), lr=0.01, max_grad_norm=max_grad_norm)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=use_scaler)
        for _ in range(5):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            grads_before = [p.grad.clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            for p, g in zip(model.parameters(), grads_before):
                assert torch.equal(p.grad, g)  # the optimizer never modifies .grad
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_grad_scaler_overflow_skips_and_backs_off():
    model, x, y = _tiny_problem()
    opt = mplamb.Lamb(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert len(opt.state) == 0  # not even lazily initialised


def test_grad_scaler_after_explicit_unscale():
    """Users who call scaler.unscale_(opt) themselves (e.g. to log the norm) get the same step."""
    runs = []
    for explicit in (False, True):
        model, x, y = _tiny_problem()
        opt = mplamb.Lamb(model.parameters(), lr=0.01, max_grad_norm=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if explicit:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_bf16_autocast_training_reduces_loss():
    model, x, y = _tiny_problem(torch.bfloat16)
    opt = mplamb.Lamb(mplamb.param_groups(model, weight_decay=0.01), lr=0.02)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


# ------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpoint_resume_is_bit_exact(dtype):
    def train(model, opt, x, y, steps, sched=None):
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
            opt.step()
            if sched is not None:
                sched.step()

    model, x, y = _tiny_problem(dtype)
    opt = mplamb.Lamb(model.parameters(), lr=0.02, weight_decay=0.01, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train(model, opt, x, y, 3, sched)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    train(model, opt, x, y, 4, sched)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, _, _ = _tiny_problem(dtype, seed=1)
    model2.load_state_dict(ckpt["model"])
    opt2 = mplamb.Lamb(model2.parameters(), lr=0.02, weight_decay=0.01, max_grad_norm=1.0)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    if dtype == torch.bfloat16:
        assert all(st["master_weight"].dtype == torch.float32 for st in opt2.state.values())
        assert all(st["exp_avg"].dtype == torch.float32 for st in opt2.state.values())
    train(model2, opt2, x, y, 4, sched2)
    for a, b in zip(uninterrupted, model2.parameters()):
        assert torch.equal(a, b.detach())


def test_state_dict_round_trip_keeps_skipped_steps_and_dtypes():
    p = torch.nn.Parameter(torch.randn(4).to(torch.bfloat16))
    opt = mplamb.Lamb([p], lr=0.1)
    p.grad = torch.full((4,), float("nan")).to(torch.bfloat16)
    opt.step()
    p.grad = torch.randn(4).to(torch.bfloat16)
    opt.step()
    sd = opt.state_dict()
    assert sd["mplamb"]["skipped_steps"] == 1
    opt2 = mplamb.Lamb([p], lr=0.1)
    opt2.load_state_dict(sd)
    assert opt2.skipped_steps == 1
    assert opt2.state[p]["master_weight"].dtype == torch.float32
    assert torch.equal(opt2.state[p]["master_weight"], opt.state[p]["master_weight"])


@pytest.mark.parametrize("mutate,fragment", [
    (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "param groups"),
    (lambda sd: sd["param_groups"][0].__setitem__("params", [0]), "parameters"),
    (lambda sd: sd["state"][0].__setitem__("exp_avg", torch.zeros(3)), "shape"),
    (lambda sd: sd["param_groups"][0].__setitem__("lr", -1.0), "lr"),
    (lambda sd: sd.pop("state"), "expected a dict with 'state'"),
])
def test_mismatched_state_dict_is_rejected_clearly(mutate, fragment):
    model, x, y = _tiny_problem()
    opt = mplamb.Lamb(model.parameters(), lr=0.01)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    mutate(sd)
    opt2 = mplamb.Lamb(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match=fragment):
        opt2.load_state_dict(sd)


# ------------------------------------------------------------------ PyTorch conventions

def test_param_groups_closure_scheduler_and_no_grad_params():
    torch.manual_seed(0)
    a, b, c = (torch.nn.Parameter(torch.randn(5)) for _ in range(3))
    opt = mplamb.Lamb([{"params": [a]}, {"params": [b], "lr": 0.5, "weight_decay": 0.1}], lr=0.01)
    opt.add_param_group({"params": [c], "max_trust_ratio": 2.0})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.5, 0.01]

    def closure():
        opt.zero_grad()
        loss = (a * a).sum() + (b * b).sum()  # c gets no gradient
        loss.backward()
        return loss

    c_before = c.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert torch.equal(c.detach(), c_before) and c not in opt.state
    assert int(opt.state[a]["step"]) == 1
    sched.step()
    assert opt.param_groups[1]["lr"] == 0.25
    opt.zero_grad()
    assert a.grad is None


def test_per_parameter_step_counts():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = mplamb.Lamb([a, b], lr=0.01)
    a.grad = torch.randn(3)
    opt.step()
    b.grad = torch.randn(3)
    opt.step()
    assert int(opt.state[a]["step"]) == 2 and int(opt.state[b]["step"]) == 1


def test_several_dtypes_in_one_optimizer():
    ps = [torch.nn.Parameter(torch.randn(4).to(d)) for d in (torch.float32, torch.bfloat16, torch.float16,
                                                              torch.float64)]
    opt = mplamb.Lamb(ps, lr=0.01)
    for p in ps:
        p.grad = torch.randn(4).to(p.dtype)
    opt.step()
    stats = opt.last_step_stats()
    assert len(stats["params"]) == 4 and stats["trust_ratio"].shape == (4,)
    assert [p.dtype for p in stats["params"]] == [p.dtype for p in ps]


def test_sparse_gradients_are_rejected_before_any_update():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    dense = torch.nn.Parameter(torch.randn(3))
    opt = mplamb.Lamb([dense, emb.weight], lr=0.1)
    dense.grad = torch.randn(3)
    emb(torch.tensor([1, 2])).sum().backward()
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(dense.detach(), before) and len(opt.state) == 0


def test_telemetry_is_consistent():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(20))
    opt = mplamb.Lamb([p], lr=0.1, weight_decay=0.01)
    w_before = p.detach().clone()
    p.grad = torch.randn(20)
    opt.step()
    st = opt.last_step_stats()
    assert float(st["weight_norm"][0]) == pytest.approx(float(w_before.norm()), rel=1e-6)
    step = float(st["step_size"][0])
    assert float((w_before - p.detach()).norm()) == pytest.approx(step * float(st["update_norm"][0]), rel=1e-5)
    assert float(st["trust_ratio"][0]) == pytest.approx(float(st["weight_norm"][0] / st["update_norm"][0]), rel=1e-6)
    assert opt.last_grad_norm is not None


def test_torch_compile_of_a_training_step():
    runs = []
    for compiled in (False, True):
        model, x, y = _tiny_problem()
        opt = mplamb.Lamb(model.parameters(), lr=0.01)

        def train_step():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss

        fn = torch.compile(train_step) if compiled else train_step
        for _ in range(3):
            fn()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_param_groups_helper():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.lin = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)
            self.scale = torch.nn.Parameter(torch.ones(4, 1))  # 2-d but in a name pattern below
            self.frozen = torch.nn.Parameter(torch.ones(3, 3), requires_grad=False)

    net = Net()
    groups = mplamb.param_groups(net, weight_decay=0.1, no_decay=("*bias", "scale"), exclude_from_adaptation=True,
                                 lr=0.5)
    decay, skip = groups
    assert {id(p) for p in decay["params"]} == {id(net.emb.weight), id(net.lin.weight)}
    assert {id(p) for p in skip["params"]} == {id(net.lin.bias), id(net.norm.weight), id(net.norm.bias),
                                                id(net.scale)}
    assert decay["weight_decay"] == 0.1 and skip["weight_decay"] == 0.0 and skip["layer_adaptation"] is False
    assert decay["lr"] == 0.5
    mplamb.Lamb(groups)  # accepted as is


BAD = [
    ({"lr": -1.0}, ValueError, "lr"),
    ({"lr": float("nan")}, ValueError, "lr"),
    ({"betas": (1.0, 0.999)}, ValueError, "betas[0]"),
    ({"betas": (0.9, -0.1)}, ValueError, "betas[1]"),
    ({"betas": 0.9}, ValueError, "betas"),
    ({"eps": -1e-8}, ValueError, "eps"),
    ({"weight_decay": -0.1}, ValueError, "weight_decay"),
    ({"max_grad_norm": 0.0}, ValueError, "max_grad_norm"),
    ({"clip_gradient": -1.0}, ValueError, "clip_gradient"),
    ({"rescale_grad": 0.0}, ValueError, "rescale_grad"),
    ({"lower_bound": 0.0}, ValueError, "lower_bound"),
    ({"upper_bound": float("inf")}, ValueError, "upper_bound"),
    ({"max_trust_ratio": -2.0}, ValueError, "max_trust_ratio"),
    ({"bias_correction": 1}, TypeError, "bias_correction"),
    ({"layer_adaptation": "no"}, TypeError, "layer_adaptation"),
    ({"master_weights": 1}, TypeError, "master_weights"),
    ({"backend": "magic"}, ValueError, "backend"),
]


@pytest.mark.parametrize("kwargs,exc,fragment", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_hyper_parameters(kwargs, exc, fragment):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(exc, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        mplamb.Lamb([p], **kwargs)
    opt = mplamb.Lamb([p])
    with pytest.raises(exc, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], **kwargs})
    assert len(opt.param_groups) == 1


def test_integer_params_rejected():
    with pytest.raises(TypeError, match="floating-point"):
        mplamb.Lamb([torch.zeros(3, dtype=torch.int64)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_replaced_state_tensors_are_used_not_remembered_ones(backend, dtype):
    """Backends may remember the addresses of state tensors between steps (LambBatch.memo); state
    replaced by the user or by load_state_dict (new tensor objects) must be the state that steps."""
    def run(replace):
        model, x, y = _tiny_problem(dtype)
        opt = mplamb.Lamb(model.parameters(), lr=0.02, weight_decay=0.01, backend=backend)
        old = []
        for step in range(4):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
            opt.step()
            if replace and step == 1:
                for st in opt.state.values():
                    for k, v in list(st.items()):
                        if isinstance(v, torch.Tensor):
                            st[k] = v.clone()  # same values, new objects
                            old.append((v, v.clone()))
        return model, opt, old

    model_a, opt_a, _ = run(False)
    model_b, opt_b, old = run(True)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    for st_a, st_b in zip(opt_a.state.values(), opt_b.state.values()):  # the new tensors stepped...
        for k, v in st_a.items():
            assert torch.equal(v, st_b[k]) if isinstance(v, torch.Tensor) else v == st_b[k]
    for v, snapshot in old:  # ...and the replaced ones were left alone
        assert torch.equal(v, snapshot)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_steps_after_a_skipped_step_match_a_run_without_it(backend, set_to_none):
    """A skipped step leaves nothing behind that a later step could pick up (gradient addresses a
    backend noted for the skipped step's phase 1, state created lazily): the run continues exactly
    as one that never saw the bad gradients.  With set_to_none=False the gradient tensors are the
    same objects from step to step, refilled in place."""
    def run(with_bad_step):
        model, x, y = _tiny_problem(torch.bfloat16)
        opt = mplamb.Lamb(model.parameters(), lr=0.02, weight_decay=0.01, backend=backend)
        for step in range(4):
            opt.zero_grad(set_to_none=set_to_none)
            torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
            if step == 1 and with_bad_step:
                saved = [p.grad.clone() for p in model.parameters()]
                next(model.parameters()).grad.view(-1)[0] = float("nan")
                opt.step()  # skipped
                for p, g in zip(model.parameters(), saved):
                    p.grad.copy_(g)
            opt.step()
        return model, opt

    model_a, opt_a = run(False)
    model_b, opt_b = run(True)
    assert opt_b.skipped_steps == 1
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    for st_a, st_b in zip(opt_a.state.values(), opt_b.state.values()):
        for k, v in st_a.items():
            assert torch.equal(v, st_b[k]) if isinstance(v, torch.Tensor) else v == st_b[k]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_skipped_first_step_creates_no_state(backend):
    """A skipped first step leaves no state, no step count and the weights untouched."""
    model, x, y = _tiny_problem(torch.bfloat16)
    before = [p.detach().clone() for p in model.parameters()]
    opt = mplamb.Lamb(model.parameters(), lr=0.02, weight_decay=0.01, backend=backend)
    torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
    next(model.parameters()).grad.view(-1)[0] = float("inf")
    opt.step()
    assert opt.skipped_steps == 1
    assert not any(opt.state[p] for p in model.parameters())
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (run under TRITON_INTERPRET=1 on CPU)")
@pytest.mark.parametrize("skipped", [False, True])
def test_phase1_is_prepared_before_the_skip_decision_and_launched_after(monkeypatch, skipped):
    """The host work of phase 1 (state, scalar rows, the Triton backend's address tables) comes before
    the step's one host synchronisation, so that a GPU does not wait for it; the kernel comes after,
    and a skipped step launches nothing and keeps no state it prepared."""
    from mplamb import optimizer as optimizer_module
    from mplamb.kernels import triton_gpu

    events = []
    real_skip, real_tables, real_kernel = optimizer_module.Lamb._skip, triton_gpu._launch, triton_gpu.K.phase1_kernel

    def skip(self, *args):
        events.append("skip decision")
        return real_skip(self, *args)

    def tables(*args):
        events.append("tables")
        return real_tables(*args)

    class Kernel:
        def __getitem__(self, grid):
            events.append("phase-1 kernel")
            return real_kernel[grid]

    monkeypatch.setattr(optimizer_module.Lamb, "_skip", skip)
    monkeypatch.setattr(triton_gpu, "_launch", tables)
    monkeypatch.setattr(triton_gpu.K, "phase1_kernel", Kernel())
    params = [torch.nn.Parameter(torch.randn(5, 3).to(torch.bfloat16)), torch.nn.Parameter(torch.randn(4))]
    before = [p.detach().clone() for p in params]
    opt = mplamb.Lamb(params, lr=0.02, weight_decay=0.01, backend="triton")
    for p in params:
        p.grad = torch.randn(p.shape).to(p.dtype)
    if skipped:
        params[1].grad[0] = float("nan")
    opt.step()
    assert events[events.index("skip decision") - 1] == "tables" and events.count("tables") == 2
    if skipped:
        assert "phase-1 kernel" not in events and opt.skipped_steps == 1
        assert not any(opt.state[p] for p in params)
        assert all(torch.equal(p, b) for p, b in zip(params, before))
    else:
        assert events[events.index("skip decision") + 1] == "phase-1 kernel"
        assert all(opt.state[p]["step"] == 1 for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_interleaved_dtypes_in_one_group_step_as_if_alone(backend):
    """Parameters of several dtypes interleaved in one group are grouped by dtype (the collector's
    fast path only joins a parameter to the previous one's work when both match): each ends
    exactly where it would stepping alone."""
    torch.manual_seed(3)
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float64, torch.bfloat16, torch.float32]
    init = [torch.randn(7 + k, 3) for k in range(len(dtypes))]
    grads = [[torch.randn(7 + k, 3) for k in range(len(dtypes))] for _ in range(3)]

    def run(indices):
        ps = [torch.nn.Parameter(init[k].to(dtypes[k], copy=True)) for k in indices]
        opt = mplamb.Lamb(ps, lr=0.05, weight_decay=0.01, backend=backend)
        for step in grads:
            for p, k in zip(ps, indices):
                p.grad = step[k].to(dtypes[k])
            opt.step()
        return ps

    together = run(list(range(len(dtypes))))
    for k in range(len(dtypes)):
        (alone,) = run([k])
        assert together[k].dtype == dtypes[k] and torch.equal(together[k], alone), k


def test_a_gradient_of_the_wrong_shape_mid_group_is_rejected_before_any_update():
    ps = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    opt = mplamb.Lamb(ps, lr=0.1)
    for p in ps:
        p.grad = torch.randn(4)
    ps[2].data = torch.randn(5)  # the parameter changed shape; its old gradient no longer fits
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match="shape"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before)) and len(opt.state) == 0
