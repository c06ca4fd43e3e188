"""Lean state: the codec (spec checks), the reference's lean step, and ``Lamb(moments=..., master_weights="kahan")``.

Tolerances: the codec's decode is checked against the spec's error bounds (8-bit first moment
within half a code of the square-root grid; the dithered second moment unbiased in the
fourth-root domain to 1e-3 over 400 draws); training with lean state is compared with float32
state by the trust ratios it applies (within 5 % for 8-bit after 40 steps) and Kahan weights with
float32 masters (within 1e-4 relative after 30 steps, and 10x closer than bf16 weights without either); everything else (resume, skip, dry and capturable steps,
conversions) is bitwise.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

import mplamb
from mplamb.kernels import codec, reference
from mplamb.kernels.contract import DeviceScalars, LambBatch, run_step
from mplamb._scalars import bias_table, phase1_scalars

BLOCKED = ["8bit", "4bit"]
SHAPES = [(64, 100), (5000,), (3, 7, 300), (1, 4096), (40, 257), (4097,)]


def heavy(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.rand(shape, generator=g) ** 3


# ----------------------------------------------------------------------------- codec


@pytest.mark.parametrize("fmt", BLOCKED)
@pytest.mark.parametrize("shape", SHAPES)
def test_mean_codes_round_trip_and_shapes(fmt, shape):
    m = heavy(shape)
    q, s = codec.encode_mean(m, fmt)
    assert q.shape == codec.code_shape(fmt, shape) and s.shape == codec.scale_shape(fmt, shape)
    assert q.dtype == codec.code_dtype(fmt, "mean") and s.dtype == torch.float32
    d = codec.decode_mean(q, s, fmt, shape)
    assert d.shape == m.shape and d.dtype == torch.float32
    q2, s2 = codec.encode_mean(d, fmt)  # decoded values are code points: encoding them is the identity
    assert torch.equal(q, q2) and torch.equal(s, s2)
    # within half a code of the square-root grid: |sqrt(|d|/a) - sqrt(|m|/a)| <= 1/(2N) (+ rounding)
    n = codec.MEAN_LEVELS[fmt]
    a = codec._blocks(m, shape, codec.BLOCK[fmt]).abs().amax(-1, keepdim=True)
    rm = (codec._blocks(m, shape, codec.BLOCK[fmt]).abs() / a).sqrt()
    rd = (codec._blocks(d, shape, codec.BLOCK[fmt]).abs() / a).sqrt()
    assert float((rm - rd).abs().max()) <= 0.5 / n + 1e-6
    assert torch.equal(torch.sign(d[d != 0]), torch.sign(m[d != 0]))


@pytest.mark.parametrize("fmt", BLOCKED)
@pytest.mark.parametrize("shape", SHAPES)
def test_var_codes_never_decode_to_zero_in_a_live_block(fmt, shape):
    v = heavy(shape) ** 2
    v.view(-1)[::3] = 0.0
    q, s = codec.encode_var(v, fmt, seed=3)
    assert q.dtype == torch.uint8 and q.shape == codec.code_shape(fmt, shape)
    d = codec.decode_var(q, s, fmt, shape)
    live = codec._blocks(v, shape, codec.BLOCK[fmt]).amax(-1, keepdim=True) > 0  # blocks with a non-zero value
    dblocks = codec._blocks(d, shape, codec.BLOCK[fmt])
    inside = codec._blocks(torch.ones(shape), shape, codec.BLOCK[fmt]) > 0  # (not the padding)
    assert bool((dblocks[live.expand_as(dblocks) & inside] > 0).all())
    assert bool((dblocks[~live.expand_as(dblocks) & inside] == 0).all())
    zero = torch.zeros(shape)
    qz, sz = codec.encode_var(zero, fmt, seed=3)
    assert bool((codec.decode_var(qz, sz, fmt, shape) == 0).all())
    # the block maximum is stored exactly
    blocks = codec._blocks(v, shape, codec.BLOCK[fmt])
    dblocks = codec._blocks(d, shape, codec.BLOCK[fmt])
    assert torch.equal(blocks.amax(-1), dblocks.amax(-1))


@pytest.mark.parametrize("fmt", BLOCKED)
def test_dithered_var_is_unbiased_in_the_companded_domain(fmt):
    v = torch.full((4096,), 0.3)
    v[0] = 1.0
    acc = torch.zeros(4096, dtype=torch.float64)
    draws = 400
    for seed in range(draws):
        q, s = codec.encode_var(v, fmt, seed)
        acc += codec.decode_var(q, s, fmt, v.shape).double() ** 0.25
    assert abs(float(acc[1:].mean() / draws) - 0.3 ** 0.25) < 1e-3


def test_dither_is_deterministic_uniform_and_depends_on_the_seed():
    a, b, c = codec.dither(100_000, 5), codec.dither(100_000, 5), codec.dither(100_000, 6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32 and float(a.min()) >= 0.0 and float(a.max()) < 1.0
    assert abs(float(a.mean()) - 0.5) < 5e-3
    assert torch.equal(codec.dither(10, torch.tensor(5.0)), a[:10])  # a device seed gives the same draw


def test_a_shard_of_rows_draws_the_whole_tensors_dither_and_codes():
    """A shard of rows passes its first element's index (``offset``): its dither and codes are the whole
    tensor's rows, so FSDP2 rounds as one process does; an empty shard (0 rows) encodes and decodes."""
    whole = codec.dither(33 * 129, 7)
    assert torch.equal(codec.dither(16 * 129, 7, offset=17 * 129), whole[17 * 129:])
    assert torch.equal(codec.dither(10, torch.tensor(7.0), offset=5), whole[5:15])
    v = torch.rand(33, 129)
    for fmt in codec.BLOCKED:
        q, s = codec.encode_var(v, fmt, 7)
        q1, s1 = codec.encode_var(v[17:], fmt, 7, offset=17 * 129)
        assert torch.equal(q1, q[17:]) and torch.equal(s1, s[17:])
        for shape in [(0, 4096), (0, 129)]:
            empty = torch.zeros(shape)
            qm, sm = codec.encode_mean(empty, fmt)
            qv, sv = codec.encode_var(empty, fmt, 3, offset=4096)
            assert qm.shape == codec.code_shape(fmt, shape) and sv.shape == codec.scale_shape(fmt, shape)
            assert codec.decode_mean(qm, sm, fmt, shape).shape == shape
            assert codec.decode_var(qv, sv, fmt, shape).shape == shape


def test_dither_matches_the_documented_hash():
    def lowbias32(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        x ^= x >> 16
        return x

    seed = 2 ** 31 + 12345  # taken mod 2**31
    got = codec.dither(50, seed)
    for j in range(50):
        x = (j + (seed & 0x7FFFFFFF) * 0x9E3779B9) & 0xFFFFFFFF
        assert float(got[j]) == (lowbias32(x) >> 8) * 2.0 ** -24


def test_four_bit_packing_puts_each_block_half_in_one_nibble():
    m = torch.zeros(1, 4096)
    m[0, 0], m[0, 64], m[0, 1] = 1.0, -1.0, 1.0  # codes +7, -7, +7: block 0's bytes 0 and 1
    q, _ = codec.encode_mean(m, "4bit")
    assert q.shape == (1, 2048)
    assert int(q[0, 0]) == (7 | (((-7) & 15) << 4)) and int(q[0, 1]) == 7


def naive_pack(q):
    """The 4-bit byte layout written out element by element: a block of ``n`` codes from column ``col0`` fills
    bytes ``col0 / 2 + j`` (``j < h = ceil(n / 2)``) with code ``col0 + j`` low and ``col0 + h + j`` high."""
    rows, length = q.shape
    out = torch.zeros(rows, (length + 1) // 2, dtype=torch.uint8)
    for r in range(rows):
        for col0 in range(0, length, codec.BLOCK["4bit"]):
            n = min(codec.BLOCK["4bit"], length - col0)
            h = (n + 1) // 2
            for j in range(h):
                high = int(q[r, col0 + h + j]) if h + j < n else 0
                out[r, col0 // 2 + j] = int(q[r, col0 + j]) | (high << 4)
    return out


@pytest.mark.parametrize("shape", [(2, 4096), (3, 1500), (2, 1501), (1, 129), (1, 127), (4097,), (0, 300)])
def test_four_bit_packing_matches_the_layout_and_round_trips(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    q = torch.randint(0, 16, shape, generator=gen, dtype=torch.int32)
    packed = codec._pack(q, shape)
    assert packed.shape == codec.code_shape("4bit", shape) and packed.dtype == torch.uint8
    rows, length = codec.rows_and_length(shape)
    assert torch.equal(packed.reshape(rows, (length + 1) // 2), naive_pack(q.reshape(rows, length)))
    assert torch.equal(codec._unpack(packed, shape, signed=False), q)
    assert torch.equal(codec._unpack(packed, shape, signed=True), (q ^ 8) - 8)


def test_storage_format_rules():
    sf = codec.storage_format
    assert sf("8bit", (64, 64), torch.bfloat16) == "8bit"
    assert sf("8bit", (63, 64), torch.bfloat16) == "fp32"  # fewer than MIN_QUANTIZED_NUMEL elements
    assert sf("8bit", (64, 64), torch.float64) == "fp32"
    assert sf("bf16", (3,), torch.float32) == "bf16"
    assert sf("8bit", (8192,), torch.float32, sharded=True) == "fp32"  # 1-d shards: blocks would not follow
    assert codec.state_bytes("8bit", (1024, 1024)) == 2 * 1024 * 1024 + 8 * 1024 * 4


def test_kahan_split_holds_the_rounding_error():
    new = torch.randn(1000) * 3
    p, c = codec.kahan_split(new, torch.bfloat16)
    assert p.dtype == c.dtype == torch.bfloat16
    eff = codec.effective_weight(p, c)
    assert float((eff - new).abs().max()) <= float((new - p.float()).abs().max()) / 100


# ----------------------------------------------------------------------------- reference lean step


def lean_batch(fmt, kahan, dtype=torch.bfloat16, shapes=((64, 80), (5000,), (7,)), seed=0, t=1):
    g = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(s, generator=g) * 0.5).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    fmts = [codec.storage_format(fmt, s, dtype) for s in shapes]
    assert len(set(fmts)) == 1 or fmt in BLOCKED
    means, vars_, ms, vs = [], [], [], []
    for s in shapes:
        m, v = heavy(s, seed + 1) * 0.1, heavy(s, seed + 2) ** 2 * 0.01
        qm, sm = codec.encode_mean(m, fmt)
        qv, sv = codec.encode_var(v, fmt, 0)
        means.append(qm), vars_.append(qv), ms.append(sm), vs.append(sv)
    comps = [torch.zeros_like(w) for w in weights] if kahan else None
    sc = phase1_scalars(t=t, wd=0.01, beta1=0.9, beta2=0.999, epsilon=1e-6, bias_correction=True,
                        rescale_grad=1.0, clip_gradient=-1.0, dtype=torch.float32, grad_averaging=True)
    blocked = fmt in BLOCKED
    return LambBatch(weights=weights, grads=grads, means=means, vars=vars_, masters=[None] * len(shapes),
                     outs=weights, scalars=[sc] * len(shapes), lrs=[0.01] * len(shapes), moment_format=fmt,
                     mean_scales=ms if blocked else None, var_scales=vs if blocked else None, comps=comps,
                     counts=[t] * len(shapes))


def snapshot(batch):
    out = []
    for xs in (batch.weights, batch.means, batch.vars, batch.mean_scales, batch.var_scales, batch.comps):
        out.append(None if xs is None else [x.clone() for x in xs])
    return out


def same(a, b):
    for xa, xb in zip(a, b):
        assert (xa is None) == (xb is None)
        if xa is not None:
            for ta, tb in zip(xa, xb):
                assert torch.equal(ta, tb)


@pytest.mark.parametrize("fmt", ["8bit", "4bit"])
@pytest.mark.parametrize("kahan", [False, True])
def test_dry_phase1_then_phase2_equals_the_plain_step_bitwise(fmt, kahan):
    shapes = ((64, 80), (40, 257))
    plain, dry = lean_batch(fmt, kahan, shapes=shapes), lean_batch(fmt, kahan, shapes=shapes)
    before = snapshot(dry)
    p1 = reference.phase1_batch(dry, dry=True)
    same(snapshot(dry), before)  # a dry phase 1 writes nothing
    r1 = run_step(reference, plain)
    from mplamb.kernels.contract import finish_norms, local_reducer
    _, steps, _ = finish_norms(dry, p1.sumsq[:2], local_reducer)
    reference.phase2_batch(dry, p1, steps)
    same(snapshot(dry), snapshot(plain))
    assert torch.equal(r1.sumsq, p1.sumsq[:2])


@pytest.mark.parametrize("skip", [False, True])
def test_capturable_lean_step_matches_host_step_or_writes_nothing(skip):
    shapes = ((64, 80), (40, 257))
    host, dev = lean_batch("8bit", True, shapes=shapes, t=3), lean_batch("8bit", True, shapes=shapes, t=3)
    before = snapshot(dev)
    steps = [torch.tensor(2.0) for _ in shapes]
    dev.on_device = DeviceScalars(steps=steps, bias=bias_table(0.9, 0.999, True, torch.float32),
                                  lr=torch.tensor(0.01, dtype=torch.float64), skip=torch.tensor(skip))
    dev.counts = None
    run_step(reference, dev)
    if skip:
        same(snapshot(dev), before)
        assert all(float(s) == 2.0 for s in steps)
    else:
        run_step(reference, host)
        same(snapshot(dev), snapshot(host))
        assert all(float(s) == 3.0 for s in steps)


def test_the_update_is_the_one_the_stored_codes_give():
    batch = lean_batch("8bit", False, shapes=((64, 80),))
    w0 = batch.weights[0].float().clone()
    res = run_step(reference, batch)
    u = reference.blocked_direction(batch.means[0], batch.mean_scales[0], batch.vars[0], batch.var_scales[0],
                                    "8bit", w0, batch.scalars[0])
    assert torch.equal(torch.sqrt(reference.sum_of_squares(u)), res.update_norms[0])
    # the per-block evaluation is LAMB's m_hat / (sqrt(v_hat) + eps) + wd * w of the decoded moments, up to rounding
    m = codec.decode_mean(batch.means[0], batch.mean_scales[0], "8bit", (64, 80))
    v = codec.decode_var(batch.vars[0], batch.var_scales[0], "8bit", (64, 80))
    full = reference.direction(m, v, w0, batch.scalars[0])
    assert batch.scalars[0].bias1 is not None and batch.scalars[0].bias1 != 1.0
    torch.testing.assert_close(u, full, rtol=1e-5, atol=0)


@pytest.mark.parametrize("t", [3, 400])
def test_bf16_moments_take_the_bias_corrections_as_per_tensor_factors_and_fp32_moments_the_full_state_update(t):
    shapes = ((64, 80), (7,))
    for fmt in ("bf16", "fp32"):
        batch = lean_batch(fmt, True, shapes=shapes, t=t)
        sc = batch.scalars[0]
        w0 = [codec.effective_weight(w, c) for w, c in zip(batch.weights, batch.comps)]
        res = run_step(reference, batch)
        for i, shape in enumerate(shapes):
            m = codec.decode_mean(batch.means[i], None, fmt, shape)
            v = codec.decode_var(batch.vars[i], None, fmt, shape)
            full = reference.direction(m, v, w0[i], sc)
            if fmt == "fp32":
                u = full
            else:  # written out: (m * RN32(1/bias1)) / (sqrt(v) * sqrt(RN32(1/bias2)) + eps) + w * wd
                a = torch.tensor(1.0 / sc.bias1, dtype=torch.float32)
                s = torch.sqrt(torch.tensor(1.0, dtype=torch.float32) / sc.bias2)
                u = (m * a) / (torch.sqrt(v) * s + sc.epsilon) + w0[i] * sc.wd
                assert torch.equal(u, reference.factored_direction(m, v, w0[i], sc))
                torch.testing.assert_close(u, full, rtol=1e-5, atol=0)  # the same update up to rounding
            assert torch.equal(torch.sqrt(reference.sum_of_squares(u)), res.update_norms[i])


# ----------------------------------------------------------------------------- the optimizer


def model(dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 96),
                               torch.nn.LayerNorm(96), torch.nn.Linear(96, 8)).to(dtype)


def data(step, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 64, generator=g).to(dtype), torch.randn(32, 8, generator=g)


def train(net, opt, steps, start=0):
    for i in range(start, start + steps):
        x, y = data(i, next(net.parameters()).dtype)
        opt.zero_grad()
        (net(x).float() - y).pow(2).mean().backward()
        opt.step()


def full_state(opt):
    return {id(p): {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)} for p, st in opt.state.items()}


@pytest.mark.parametrize("moments", ["bf16", "8bit", "4bit"])
@pytest.mark.parametrize("master_weights", [None, "kahan", False])
def test_lean_state_keys_dtypes_and_memory(moments, master_weights):
    net = model()
    opt = mplamb.Lamb(net.parameters(), lr=1e-2, moments=moments, master_weights=master_weights)
    train(net, opt, 2)
    w = net[0].weight
    st = opt.state[w]
    fmt = codec.storage_format(moments, w.shape, w.dtype)
    assert st["exp_avg"].dtype == codec.code_dtype(fmt, "mean")
    assert st["exp_avg_sq"].dtype == codec.code_dtype(fmt, "var")
    assert ("exp_avg_scale" in st) == (fmt in BLOCKED)
    assert ("master_weight" in st) == (master_weights is None)
    assert ("kahan_comp" in st) == (master_weights == "kahan")
    bias = opt.state[net[0].bias]  # small: float32 moments
    assert bias["exp_avg"].dtype == (torch.bfloat16 if moments == "bf16" else torch.float32)
    mem = opt.state_memory()
    counted = sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items() if k != "step")
    assert mem["state_bytes"] == counted and mem["params"] == sum(p.numel() for p in net.parameters())


def test_eight_bit_moments_with_kahan_weights_take_at_most_4_1_bytes_per_parameter():
    torch.manual_seed(0)
    net = torch.nn.Sequential(*[torch.nn.Linear(768, 768) for _ in range(3)]).to(torch.bfloat16)
    opt = mplamb.Lamb(net.parameters(), moments="8bit", master_weights="kahan")
    net(torch.randn(4, 768, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    assert opt.state_memory()["bytes_per_param"] <= 4.1
    full = mplamb.Lamb(net.parameters())
    full.step()
    assert full.state_memory()["bytes_per_param"] == 12.0


def test_eight_bit_state_follows_fp32_state_trust_ratios():
    nets = [model(seed=1), model(seed=1)]
    opts = [mplamb.Lamb(nets[0].parameters(), lr=5e-3, weight_decay=0.01),
            mplamb.Lamb(nets[1].parameters(), lr=5e-3, weight_decay=0.01, moments="8bit")]
    for i in range(40):
        for net, opt in zip(nets, opts):
            train(net, opt, 1, start=i)
    a, b = (o.last_step_stats()["trust_ratio"] for o in opts)
    assert float(((a - b).abs() / a).max()) < 0.05


def test_kahan_weights_follow_fp32_masters():
    nets = [model(seed=2), model(seed=2), model(seed=2)]
    opts = [mplamb.Lamb(nets[0].parameters(), lr=1e-3), mplamb.Lamb(nets[1].parameters(), lr=1e-3,
                                                                      master_weights="kahan"),
            mplamb.Lamb(nets[2].parameters(), lr=1e-3, master_weights=False)]
    for i in range(30):
        for net, opt in zip(nets, opts):
            train(net, opt, 1, start=i)
    w = nets[0][0].weight
    master = opts[0].state[w]["master_weight"]
    kahan = codec.effective_weight(nets[1][0].weight.detach(), opts[1].state[nets[1][0].weight]["kahan_comp"])
    plain = nets[2][0].weight.float()
    err_kahan = float((kahan - master).norm() / master.norm())
    err_plain = float((plain - master).norm() / master.norm())
    assert err_kahan < 1e-4 and err_kahan * 10 < err_plain


@pytest.mark.parametrize("moments", ["8bit", "4bit", "bf16"])
def test_resume_from_state_dict_is_bitwise(moments):
    net = model()
    opt = mplamb.Lamb(net.parameters(), lr=1e-2, moments=moments, master_weights="kahan")
    train(net, opt, 3)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    train(net, opt, 3, start=3)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    net2 = model(seed=9)
    net2.load_state_dict(ck["model"])
    opt2 = mplamb.Lamb(net2.parameters(), lr=1e-2, moments=moments, master_weights="kahan")
    opt2.load_state_dict(ck["opt"])
    train(net2, opt2, 3, start=3)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(net.parameters(), net2.parameters()):
        a, b = opt.state[p], opt2.state[q]
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_deepcopy_keeps_lean_state():
    net = model()
    opt = mplamb.Lamb(net.parameters(), moments="8bit", master_weights="kahan")
    train(net, opt, 2)
    twin = copy.deepcopy(opt)
    assert twin.param_groups[0]["moments"] == "8bit" and twin.param_groups[0]["master_weights"] == "kahan"


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradient_skips_the_lean_step_bitwise(bad):
    net = model()
    opt = mplamb.Lamb(net.parameters(), lr=1e-2, moments="8bit", master_weights="kahan")
    train(net, opt, 2)
    params = [p.clone() for p in net.parameters()]
    state = full_state(opt)
    x, y = data(5)
    opt.zero_grad()
    (net(x).float() - y).pow(2).mean().backward()
    net[2].weight.grad[0, 0] = bad
    opt.step()
    assert opt.skipped_steps == 1
    for p, q in zip(net.parameters(), params):
        assert torch.equal(p, q)
    after = full_state(opt)
    for k in state:
        for name in state[k]:
            assert torch.equal(state[k][name], after[k][name])


def test_grad_scaler_with_lean_state_matches_unscaled_training_bitwise():
    nets = [model(seed=3), model(seed=3)]
    opts = [mplamb.Lamb(n.parameters(), lr=1e-2, moments="8bit", master_weights="kahan") for n in nets]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for i in range(4):
        x, y = data(i)
        opts[0].zero_grad()
        (nets[0](x).float() - y).pow(2).mean().backward()
        opts[0].step()
        opts[1].zero_grad()
        scaler.scale((nets[1](x).float() - y).pow(2).mean()).backward()
        scaler.step(opts[1])
        scaler.update()
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q)


def test_mixed_groups_each_keep_their_own_storage():
    net = model()
    opt = mplamb.Lamb([{"params": net[0].parameters(), "moments": "8bit", "master_weights": "kahan"},
                       {"params": net[2].parameters(), "moments": "bf16"},
                       {"params": list(net[3].parameters()) + list(net[4].parameters())}], lr=1e-2)
    train(net, opt, 3)
    assert opt.state[net[0].weight]["exp_avg"].dtype == torch.int8
    assert "kahan_comp" in opt.state[net[0].weight]
    assert opt.state[net[2].weight]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[net[4].weight]["exp_avg"].dtype == torch.float32
    assert "master_weight" in opt.state[net[4].weight]


@pytest.mark.parametrize("src,dst", [("fp32", "8bit"), ("8bit", "fp32"), ("8bit", "4bit"), ("bf16", "8bit")])
@pytest.mark.parametrize("src_mw,dst_mw", [(None, "kahan"), ("kahan", None), (None, None)])
def test_loading_across_storage_modes_converts(src, dst, src_mw, dst_mw):
    net = model()
    opt = mplamb.Lamb(net.parameters(), lr=1e-2, moments=src, master_weights=src_mw)
    train(net, opt, 3)
    sd = opt.state_dict()
    w = net[0].weight
    held_m = codec.decode_mean(opt.state[w]["exp_avg"], opt.state[w].get("exp_avg_scale"),
                               codec.storage_format(src, w.shape, w.dtype), w.shape)
    if src_mw is None:
        held_w = opt.state[w]["master_weight"].clone()
    else:
        held_w = codec.effective_weight(w, opt.state[w]["kahan_comp"])
    opt2 = mplamb.Lamb(net.parameters(), lr=1e-2, moments=dst, master_weights=dst_mw)
    opt2.load_state_dict(sd)
    g = opt2.param_groups[0]
    assert g["moments"] == dst and g["master_weights"] == dst_mw  # the loading optimizer's storage
    st = opt2.state[w]
    fmt = codec.storage_format(dst, w.shape, w.dtype)
    assert st["exp_avg"].dtype == codec.code_dtype(fmt, "mean")
    m = codec.decode_mean(st["exp_avg"], st.get("exp_avg_scale"), fmt, w.shape)
    tol = {"fp32": 0.0, "bf16": 0.01, "8bit": 0.02, "4bit": 0.3}[fmt]
    assert float((m - held_m).norm() / held_m.norm()) <= tol
    weight = st["master_weight"] if dst_mw is None else codec.effective_weight(w, st["kahan_comp"])
    assert float((weight - held_w).abs().max()) <= float(held_w.abs().max()) * 2 ** -16
    train(net, opt2, 2, start=3)  # and it steps


def test_bad_lean_options_are_rejected_clearly():
    net = model()
    with pytest.raises(ValueError, match="moments: expected one of"):
        mplamb.Lamb(net.parameters(), moments="int8")
    with pytest.raises(TypeError, match="master_weights: expected None, a bool or 'kahan'"):
        mplamb.Lamb(net.parameters(), master_weights="fp16")


def test_a_backend_without_lean_kernels_is_refused_before_any_update():
    net = model()
    opt = mplamb.Lamb(net.parameters(), moments="8bit", backend="foreach")
    x, y = data(0)
    (net(x).float() - y).pow(2).mean().backward()
    before = [p.clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="no kernels for lean state"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before)) and not opt.state


def test_a_checkpoint_with_wrong_code_shapes_is_rejected():
    net = model()
    opt = mplamb.Lamb(net.parameters(), moments="4bit")
    train(net, opt, 1)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"][:, :-1].clone()
    with pytest.raises(ValueError, match="state 'exp_avg'"):
        mplamb.Lamb(net.parameters(), moments="4bit").load_state_dict(sd)
