"""Which block-quantization map, block size and rounding should store Adam's moments m and v?

Run: ``python benchmarks/moment_codecs.py [--quick] [--bits 8 4] [--no-model] [--no-synthetic]``.
Self-contained (plain torch, no mplamb import), seeded and deterministic.

Every candidate stores m and v block-wise, one float32 absmax scale per block of B consecutive
elements along a row (row = dim 0, row length = product of the other dims; a 1-D tensor is one row,
the last block of a row is zero-padded).  Every step the state is decoded, updated in float32
(``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g*g``) and re-encoded, exactly as a quantized
optimizer does, while an exact float32 tracker runs in parallel on the same gradients.  Because the
decoded value is a pure function of the codes, the simulation keeps ``decode(encode(x))`` as state.

m maps (signed, N = 127 for 8 bits, 7 for 4 bits, a = max|m| of the block):
  linear   q = round(N*m/a),                    m = a*q/N
  pow2     q = sign(m)*round(N*sqrt(|m|/a)),    t = q/N, m = a*t*|t|
v maps (K = 256 / 16 levels, b = max v of the block; "round" is nearest in the companded domain):
  linear0  q = round((K-1)*v/b),                v = b*q/(K-1)             (has zero)
  pow2     q = round((K-1)*(v/b)^(1/2)),        v = b*(q/(K-1))^2         (has zero)
  pow4     q = round((K-1)*(v/b)^(1/4)),        v = b*(q/(K-1))^4         (has zero)
  pow2-nozero / pow4-nozero: k = round(K*(v/b)^(1/p)), q = clamp(k-1, 0, K-1), v = b*((q+1)/K)^p
                                                (smallest code b/K^p > 0: v never decodes to zero)
Rounding: nearest = floor(x + 0.5); stochastic = floor(x + U[0,1)), both in the companded domain.

Reported per candidate (rows vary one thing at a time around the baselines 8-bit m=pow2/B256,
v=pow4-nozero/B256, nearest and 4-bit m=pow2/B128, v=pow4-nozero/B128, nearest; a few rows at the end
of each group combine changes or give only one moment 4 bits; bf16 m, v is a reference), with
u = m_hat/(sqrt(v_hat)+1e-6) the Adam direction:
  dir   ||u_q - u|| / ||u||
  |u|   (||u_q|| - ||u||) / ||u||, signed: the error a LAMB trust ratio sees (per tensor; for the model the
        worst tensor, signed)
  umax  max|u_q| / max|u|, worst over the evaluated steps (step 1, every T/40) and, for the model,
        over tensors: blow-ups where v decodes to 0 (or m sticks while v is rounded down)
  sv    ||sqrt(v_q) - sqrt(v)|| / ||sqrt(v)||;  sv-med: median over elements of |sqrt(v_q)/sqrt(v) - 1|

Part 1 is a synthetic heavy-tailed gradient stream (see ``synthetic_stream``); part 2 trains a tiny
byte-level causal transformer with torch.optim.Adam for a few steps, records its gradients and replays
them through both trackers (open loop: both trackers see the same gradients).
"""
from __future__ import annotations

import argparse
import math
import platform
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

BETA1, BETA2, EPS = 0.9, 0.999, 1e-6


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------- codecs
def _blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    rows = x.shape[0] if x.dim() > 1 else 1
    x2 = x.reshape(rows, -1)
    length = x2.shape[1]
    pad = (-length) % block
    if pad:
        x2 = F.pad(x2, (0, pad))
    return x2.reshape(rows, -1, block), length


def _unblock(xb: torch.Tensor, length: int, like: torch.Tensor) -> torch.Tensor:
    rows = xb.shape[0]
    return xb.reshape(rows, -1)[:, :length].reshape(like.shape)


def _round(r: torch.Tensor, stochastic: bool, gen: torch.Generator | None) -> torch.Tensor:
    if stochastic:
        return torch.floor(r + torch.rand(r.shape, generator=gen))
    return torch.floor(r + 0.5)


def roundtrip_m(x, mp: str, bits: int, block: int, stochastic: bool, gen=None):
    """decode(encode(m)) for a signed first moment."""
    n = 127 if bits == 8 else 7
    xb, length = _blocks(x, block)
    a = xb.abs().amax(-1, keepdim=True)
    s = torch.where(a > 0, a, torch.ones_like(a))
    y = xb.abs() / s
    if mp == "linear":
        r = n * y
    elif mp == "pow2":
        r = n * y.sqrt()
    else:
        raise ValueError(mp)
    k = _round(r, stochastic, gen).clamp_(0, n)  # |q| <= N: fits int8 / a sign + 3 bits
    t = k / n
    mag = t if mp == "linear" else t * t
    return _unblock(torch.sign(xb) * mag * a, length, x)


def roundtrip_v(x, mp: str, bits: int, block: int, stochastic: bool, gen=None):
    """decode(encode(v)) for a non-negative second moment."""
    levels = 256 if bits == 8 else 16
    xb, length = _blocks(x, block)
    b = xb.amax(-1, keepdim=True)
    s = torch.where(b > 0, b, torch.ones_like(b))
    y = xb / s
    base, _, nz = mp.partition("-")
    p = {"linear0": 1, "pow2": 2, "pow4": 4}[base]
    root = y if p == 1 else (y.sqrt() if p == 2 else y.sqrt().sqrt())
    if nz:  # "nozero": codes 0..K-1 decode to ((q+1)/K)^p
        k = _round(levels * root, stochastic, gen)
        q = (k - 1).clamp_(0, levels - 1)
        t = (q + 1) / levels
    else:
        q = _round((levels - 1) * root, stochastic, gen).clamp_(0, levels - 1)
        t = q / (levels - 1)
    dec = t if p == 1 else (t * t if p == 2 else (t * t) * (t * t))
    return _unblock(dec * b, length, x)


@dataclass
class Candidate:
    name: str
    bits: int  # 8, 4, or 16 for the bfloat16 reference
    v_bits: int = 0  # 0: same as bits; set when only one moment changes width
    m_map: str = "pow2"
    m_block: int = 256
    v_map: str = "pow4-nozero"
    v_block: int = 256
    m_sr: bool = False
    v_sr: bool = False
    gen: torch.Generator = field(default=None, repr=False)

    def qm(self, x):
        if self.bits == 16:
            return x.to(torch.bfloat16).float()
        return roundtrip_m(x, self.m_map, self.bits, self.m_block, self.m_sr, self.gen)

    def qv(self, x):
        if self.bits == 16:
            return x.to(torch.bfloat16).float()
        return roundtrip_v(x, self.v_map, self.v_bits or self.bits, self.v_block, self.v_sr, self.gen)


def candidates(bits_list: list[int], seed: int) -> list[Candidate]:
    out = [Candidate("bf16 m,v (reference)", 16)]
    for bits in bits_list:
        b0 = 256 if bits == 8 else 128
        other_blocks = [64, 128, 512] if bits == 8 else [32, 64, 256]
        base = dict(bits=bits, m_block=b0, v_block=b0)
        tag = f"{bits}b"
        out.append(Candidate(f"{tag} BASELINE m=pow2 v=pow4-nz B{b0} nearest", **base))
        out.append(Candidate(f"{tag} m=linear", m_map="linear", **base))
        for vm in ["linear0", "pow2", "pow4", "pow2-nozero"]:
            out.append(Candidate(f"{tag} v={vm}", v_map=vm, **base))
        for blk in other_blocks:
            out.append(Candidate(f"{tag} B={blk} (m and v)", bits=bits, m_block=blk, v_block=blk))
        out.append(Candidate(f"{tag} stochastic m and v", m_sr=True, v_sr=True, **base))
        out.append(Candidate(f"{tag} stochastic m only", m_sr=True, **base))
        out.append(Candidate(f"{tag} stochastic v only", v_sr=True, **base))
        # combinations and mixed widths: is the best single change additive, which moment needs the bits?
        if bits == 8:
            out.append(Candidate(f"{tag} combo B=64 + stochastic v", bits=8, m_block=64, v_block=64, v_sr=True))
        else:
            out.append(Candidate(f"{tag} combo B=32 + stochastic v", bits=4, m_block=32, v_block=32, v_sr=True))
            out.append(Candidate(f"{tag} mixed: m 8-bit, v 4-bit", bits=8, v_bits=4, m_block=b0, v_block=b0))
            out.append(Candidate(f"{tag} mixed: m 4-bit, v 8-bit", bits=4, v_bits=8, m_block=b0, v_block=b0))
            out.append(Candidate(f"{tag} mixed: m 8-bit, v 4-bit stoch.", bits=8, v_bits=4, m_block=b0, v_block=b0,
                                 v_sr=True))
    for i, c in enumerate(out):
        c.gen = torch.Generator().manual_seed(seed * 1000 + i)
    return out


def self_test() -> None:
    """Cheap invariants: block maxima decode exactly, zeros stay zero, nozero maps never return 0."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 300, generator=g) * torch.logspace(-4, 0, 300)
    for bits in (8, 4):
        for mp in ("linear", "pow2"):
            for sr in (False, True):
                y = roundtrip_m(x, mp, bits, 64, sr, g)
                assert torch.equal(y.abs().amax(), x.abs().amax()) and y.shape == x.shape
        v = x * x
        v[0, :5] = 0
        for mp in ("linear0", "pow2", "pow4", "pow2-nozero", "pow4-nozero"):
            for sr in (False, True):
                y = roundtrip_v(v, mp, bits, 64, sr, g)
                assert torch.equal(y.amax(), v.amax()) and (y >= 0).all()
                if mp.endswith("nozero"):
                    assert (y[:, :256] > 0).all()  # the zero-padded tail block of each row is all zero
                    assert torch.equal(y[0, :5] > 0, torch.ones(5, dtype=torch.bool))


# ---------------------------------------------------------------- tracking
class Tracker:
    """An exact float32 moment pair and, per candidate, the quantized pair, for a list of tensors."""

    def __init__(self, shapes, cands):
        self.cands = cands
        self.m = [torch.zeros(s) for s in shapes]
        self.v = [torch.zeros(s) for s in shapes]
        self.qm = [[torch.zeros(s) for s in shapes] for _ in cands]
        self.qv = [[torch.zeros(s) for s in shapes] for _ in cands]
        self.worst_umax = [0.0] * len(cands)
        self.t = 0

    def step(self, grads):
        self.t += 1
        for i, g in enumerate(grads):
            g2 = g * g
            self.m[i].mul_(BETA1).add_(g, alpha=1 - BETA1)
            self.v[i].mul_(BETA2).add_(g2, alpha=1 - BETA2)
            for c, cand in enumerate(self.cands):
                m = self.qm[c][i].mul_(BETA1).add_(g, alpha=1 - BETA1)
                v = self.qv[c][i].mul_(BETA2).add_(g2, alpha=1 - BETA2)
                self.qm[c][i] = cand.qm(m)
                self.qv[c][i] = cand.qv(v)

    def _u(self, m, v):
        bc1, bc2 = 1 - BETA1 ** self.t, 1 - BETA2 ** self.t
        return (m / bc1) / ((v / bc2).sqrt() + EPS)

    def metrics(self):
        """Per candidate: dir, signed worst-tensor |u| error, umax (this step), sv, sv-med."""
        us = [self._u(m, v) for m, v in zip(self.m, self.v)]
        u_all = torch.cat([u.flatten() for u in us])
        sv_all = torch.cat([v.flatten() for v in self.v]).sqrt()
        unorm = torch.linalg.vector_norm(u_all)
        out = []
        for c in range(len(self.cands)):
            uq = [self._u(m, v) for m, v in zip(self.qm[c], self.qv[c])]
            uq_all = torch.cat([u.flatten() for u in uq])
            d = (torch.linalg.vector_norm(uq_all - u_all) / unorm).item()
            nrm, umax = 0.0, 0.0
            for u, q in zip(us, uq):
                n0 = torch.linalg.vector_norm(u)
                if n0 > 0:
                    e = ((torch.linalg.vector_norm(q) - n0) / n0).item()
                    nrm = e if abs(e) > abs(nrm) else nrm
                mx = u.abs().amax()
                if mx > 0:
                    umax = max(umax, (q.abs().amax() / mx).item())
            self.worst_umax[c] = max(self.worst_umax[c], umax)
            svq = torch.cat([v.flatten() for v in self.qv[c]]).sqrt()
            sv = (torch.linalg.vector_norm(svq - sv_all) / torch.linalg.vector_norm(sv_all)).item()
            pos = sv_all > 0
            svmed = ((svq[pos] / sv_all[pos]) - 1).abs().median().item()
            out.append((d, nrm, umax, sv, svmed))
        return out


def print_table(title, cands, checkpoints, results, worst_umax):
    """results[t][c] = metric tuple at checkpoint t."""
    print(f"\n{title}")
    cps = [f"@{t}" for t in checkpoints]
    head = (f"{'candidate':44s} " + " ".join(f"{'dir' + s:>9s}" for s in cps) + " | "
            + " ".join(f"{'|u|' + s:>9s}" for s in cps)
            + f" | {'umax':>7s} {'sv' + cps[-1]:>9s} {'svmed' + cps[-1]:>11s}")
    print(head)
    print("-" * len(head))
    for c, cand in enumerate(cands):
        row = f"{cand.name:44s} " + " ".join(f"{results[t][c][0]:9.2e}" for t in checkpoints) + " | "
        row += " ".join(f"{results[t][c][1]:+9.1e}" for t in checkpoints)
        last = results[checkpoints[-1]][c]
        row += f" | {worst_umax[c]:7.3g} {last[3]:9.2e} {last[4]:11.2e}"
        print(row)


# ---------------------------------------------------------------- part 1: synthetic stream
def synthetic_stream(rows, cols, steps, seed):
    """Yields (t, g) for t = 1..steps.  Per element: g = s(t) * (mu + sigma * z) (+ rare spikes), with
    sigma log-uniform over 3 decades (1e-4.5 .. 1e-1.5), 5% of rows 30x larger, mu ~ 0.3*sigma*N(0,1),
    1% of elements that spike (prob 0.002 per step, 50 sigma), 2% near-zero elements (sigma 1e-4 smaller),
    a global scale s(t) = 0.3 + 0.7*exp(-t/300) (gradients shrink as training proceeds) and, at
    t = steps/2, 30% of elements whose sigma and mu drop 10x (the case where a re-quantized v can stick:
    one step of decay moves v by only 0.1%)."""
    gen = torch.Generator().manual_seed(seed)
    sigma = 10.0 ** (-4.5 + 3.0 * torch.rand(rows, cols, generator=gen))
    big_rows = torch.rand(rows, generator=gen) < 0.05
    sigma[big_rows] *= 30.0
    tiny = torch.rand(rows, cols, generator=gen) < 0.02
    sigma[tiny] *= 1e-4
    mu = 0.3 * sigma * torch.randn(rows, cols, generator=gen)
    spiky = torch.rand(rows, cols, generator=gen) < 0.01
    drop = torch.rand(rows, cols, generator=gen) < 0.30
    spiky_idx = spiky.nonzero(as_tuple=True)
    for t in range(1, steps + 1):
        if t == steps // 2 + 1:
            sigma = torch.where(drop, sigma * 0.1, sigma)
            mu = torch.where(drop, mu * 0.1, mu)
        g = mu + sigma * torch.randn(rows, cols, generator=gen)
        hit = torch.rand(spiky_idx[0].numel(), generator=gen) < 0.002
        if hit.any():
            r, c = spiky_idx[0][hit], spiky_idx[1][hit]
            sign = torch.where(torch.rand(r.numel(), generator=gen) < 0.5, -1.0, 1.0)
            g[r, c] += 50.0 * sigma[r, c] * sign
        yield t, g * (0.3 + 0.7 * math.exp(-t / 300))


def run_synthetic(cands, rows, cols, steps, checkpoints, seed, every):
    tr = Tracker([(rows, cols)], cands)
    results = {}
    start = time.perf_counter()
    for t, g in synthetic_stream(rows, cols, steps, seed):
        tr.step([g])
        if t == 1 or t in checkpoints or t % every == 0:
            met = tr.metrics()
            if t in checkpoints:
                results[t] = met
    el = time.perf_counter() - start
    print_table(f"Part 1: synthetic heavy-tailed moments, {rows} x {cols}, T = {steps} "
                f"(umax: worst of step 1 and every {every} steps) [{el:.0f} s]",
                cands, checkpoints, results, tr.worst_umax)


# ---------------------------------------------------------------- part 2: tiny byte-level transformer
def corpus_bytes() -> bytes:
    import codecs
    import collections
    import json
    import textwrap
    import string
    import functools
    import itertools
    import this  # noqa: F401  (prints the Zen once; its text is ROT13 in this.s)

    parts = [codecs.decode(this.s, "rot13")]
    for mod in (collections, json, textwrap, string, functools, itertools, argparse, math):
        parts.append(mod.__doc__ or "")
        for name in sorted(dir(mod)):
            obj = getattr(mod, name)
            doc = getattr(obj, "__doc__", None)
            if not name.startswith("_") and isinstance(doc, str) and callable(obj):
                parts.append(doc)
    return "\n\n".join(parts).encode("utf-8", "replace")


class TinyGPT(torch.nn.Module):
    def __init__(self, d_model, layers, ctx):
        super().__init__()
        self.emb = torch.nn.Embedding(256, d_model)
        self.pos = torch.nn.Parameter(torch.randn(ctx, d_model) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(d_model, 4, 4 * d_model, dropout=0.0, batch_first=True)
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, 256)
        self.register_buffer("mask", torch.nn.Transformer.generate_square_subsequent_mask(ctx))

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        h = self.body(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True)
        return self.head(self.norm(h))


def record_model_grads(steps, d_model, layers, ctx, batch, seed):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        data = torch.tensor(list(corpus_bytes()), dtype=torch.long)
    torch.manual_seed(seed)
    model = TinyGPT(d_model, layers, ctx)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(BETA1, BETA2), eps=EPS)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters()]
    grads, losses = [], []
    for _ in range(steps):
        idx = torch.randint(0, data.numel() - ctx - 1, (batch,), generator=gen)
        x = torch.stack([data[i: i + ctx] for i in idx])
        y = torch.stack([data[i + 1: i + ctx + 1] for i in idx])
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads.append([p.grad.detach().clone() for p in params])
        losses.append(loss.item())
        opt.step()
    n = sum(p.numel() for p in params)
    return grads, losses, n, len(data), [tuple(p.shape) for p in params]


def run_model(cands, steps, checkpoints, d_model, layers, ctx, batch, seed):
    start = time.perf_counter()
    grads, losses, n, nbytes, shapes = record_model_grads(steps, d_model, layers, ctx, batch, seed)
    rec = time.perf_counter() - start
    tr = Tracker(shapes, cands)
    results = {}
    for t, gs in enumerate(grads, 1):
        tr.step(gs)
        if t == 1 or t in checkpoints or t % 5 == 0:
            met = tr.metrics()
            if t in checkpoints:
                results[t] = met
    el = time.perf_counter() - start
    print_table(f"Part 2: tiny byte-level transformer (d_model {d_model}, {layers} layers, {n:,} params in "
                f"{len(shapes)} tensors, corpus {nbytes:,} bytes), Adam lr 1e-3, {steps} steps, loss "
                f"{losses[0]:.2f} -> {losses[-1]:.2f}; |u| = worst tensor, umax = worst tensor, "
                "of step 1 and every 5 steps "
                f"[record {rec:.0f} s, total {el:.0f} s]", cands, checkpoints, results, tr.worst_umax)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps (a smoke run, ~30 s on 2 cores)")
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4], choices=[8, 4])
    parser.add_argument("--rows", type=int, help="synthetic tensor rows (default 128, quick 64)")
    parser.add_argument("--cols", type=int, help="synthetic tensor row length (default 1024, quick 512)")
    parser.add_argument("--steps", type=int, help="synthetic steps T (default 2000, quick 300)")
    parser.add_argument("--model-steps", type=int, help="transformer steps (default 100, quick 30)")
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    rows = args.rows or (64 if args.quick else 128)
    cols = args.cols or (512 if args.quick else 1024)
    steps = args.steps or (300 if args.quick else 2000)
    msteps = args.model_steps or (30 if args.quick else 100)
    print(f"CPU: {cpu_model()}  ({torch.get_num_threads()} torch threads)   torch {torch.__version__}   "
          f"python {platform.python_version()}")
    print(f"beta1 {BETA1}, beta2 {BETA2}, eps {EPS}, bias correction on; seed {args.seed}")
    self_test()
    cands = candidates(args.bits, args.seed)
    if not args.no_synthetic:
        cps = sorted({c for c in (10, 100, 1000, steps) if c <= steps})
        run_synthetic(cands, rows, cols, steps, cps, args.seed, every=max(1, steps // 40))
    if not args.no_model:
        cps = sorted({c for c in (10, 50, msteps) if c <= msteps})
        d_model = 64 if args.quick else 128
        run_model(cands, msteps, cps, d_model, 2, 64, 16 if args.quick else 32, args.seed)


if __name__ == "__main__":
    main()
