"""One process of the 2-process distributed tests (launched by test_distributed.py).

Every scenario trains the same small model for STEPS steps on the same data on every rank
(so data-parallel gradients equal the single-process ones exactly) and compares the
weights with a single-process run of the same model and optimizer.  Results go to a JSON
file per rank; the tests read them.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import mplamb

STEPS = 5
HP = dict(lr=0.05, weight_decay=0.01, max_grad_norm=0.5)
NO_CLIP = dict(lr=0.05, weight_decay=0.01)  # no global-norm clipping: a sharded step costs one all-reduce
LOOSE_CLIP = dict(lr=0.05, weight_decay=0.01, max_grad_norm=1e6)  # clipping on, never clips: one all-reduce
TIGHT_CLIP = dict(lr=0.05, weight_decay=0.01, max_grad_norm=1e-3)  # clips every step: two all-reduces
OUT_DIR = "."  # the results' folder (main sets it): scenarios write checkpoints there


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    # uneven first dimensions: 7 rows split 4/3, and 1 row (and a (1,) bias) that leaves rank 1 an empty shard
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 1)).to(dtype)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)


def train(model, opt, steps=STEPS, dtype=torch.float32):
    x, y = data()
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        loss.backward()
        opt.step()


def full(p):
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double()


def max_diff(model, ref):
    return max(float((full(a) - full(b)).abs().max()) for a, b in zip(model.parameters(), ref.parameters()))


def reference(dtype=torch.float32, hp=HP):
    model = make_model(dtype)
    train(model, mplamb.Lamb(model.parameters(), **hp), dtype=dtype)
    return model


def scenario_ddp():
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    train(model, mplamb.Lamb(model.parameters(), **HP))
    return {"max_diff": max_diff(model.module, reference())}


def scenario_zero1(explicit=True):
    """ZeRO-1; ``explicit=False``: no ``partition_group`` given, Lamb finds ZeRO's group itself."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=mplamb.Lamb,
                                  **(dict(partition_group="world") if explicit else {}), **HP)
    train(model, opt)
    out = {"max_diff": max_diff(model.module, reference()), "found_group": opt.optim.partition_group is not None}
    opt.consolidate_state_dict(to=0)
    if dist.get_rank() == 0:
        sd = opt.state_dict()
        out["consolidated_params_with_state"] = len(sd["state"])
        out["consolidated_has_master_or_moments"] = all("exp_avg" in st for st in sd["state"].values())
    # a NaN gradient on one rank's partition only: every rank must skip
    x, y = data()
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    if dist.get_rank() == 1:  # a parameter that only rank 1's partition steps
        opt.optim.param_groups[0]["params"][0].grad.view(-1)[0] = float("nan")
    opt.step()
    out["nan_skipped_everywhere"] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    return out


def fsdp_model(dtype):
    from torch.distributed.fsdp import fully_shard

    model = make_model(dtype)
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


def scenario_fsdp2(dtype, local_norms=False, hp=HP):
    from torch.distributed.tensor.debug import CommDebugMode

    model = fsdp_model(dtype)
    if local_norms:  # the bug other LAMBs have: norms of the local shard only
        import mplamb.optimizer as mo

        saved = mo.shard_group
        mo.shard_group = lambda p, pg=None: None
    try:
        opt = mplamb.Lamb(model.parameters(), **hp)
        x, y = data()
        train(model, opt, STEPS - 1, dtype=dtype)
        opt.zero_grad()
        nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
        with CommDebugMode() as comm:
            opt.step()
    finally:
        if local_norms:
            mo.shard_group = saved
    counts = {str(k): v for k, v in comm.get_comm_counts().items()}
    clipped_last_step = bool(opt.last_grad_norm > hp["max_grad_norm"]) if "max_grad_norm" in hp else False
    local_sizes = [p.to_local().numel() for p in model.parameters()]
    state = opt.state[next(iter(model.parameters()))]
    return {"max_diff": max_diff(model, reference(dtype, hp)), "comm_counts": counts, "clipped": clipped_last_step,
            "total_collectives": comm.get_total_counts(), "local_sizes": local_sizes,
            "param_dtype": str(next(model.parameters()).dtype), "state_keys": sorted(state),
            "master_is_dtensor": type(state.get("master_weight", None)).__name__}


def scenario_fsdp2_capturable():
    """FSDP2 with the capturable step (the Triton backend, interpreted on CPU tensors): its sharded (dry) flow
    makes no host synchronisation, clips (a second all-reduce, always, since it cannot ask the host), and
    matches one process; a NaN on one shard is skipped on every rank."""
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Syncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                Syncs.count += 1
            return func(*args, **(kwargs or {}))

    model = fsdp_model(torch.float32)
    opt = mplamb.Lamb(model.parameters(), backend="triton", capturable=True, **HP)
    x, y = data()
    comms = []
    for _ in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x).float(), y).backward()
        with Syncs(), CommDebugMode() as comm:
            opt.step()
        comms.append(comm.get_total_counts())
    out = {"max_diff": max_diff(model, reference()), "syncs": Syncs.count, "collectives": comms}
    opt.zero_grad()
    nn.functional.mse_loss(model(x).float(), y).backward()
    before = [full(p) for p in model.parameters()]
    if dist.get_rank() == 1:
        next(iter(model.parameters())).grad.to_local().view(-1)[0] = float("nan")
    opt.step()
    out["nan_skipped_everywhere"] = all(torch.equal(a, full(b)) for a, b in zip(before, model.parameters()))
    out["skipped_steps"] = int(opt.skipped_steps)
    return out


def scenario_fsdp2_nan_on_one_shard():
    """A NaN in rank 1's shard only: the single all-reduce carries it, every rank skips, nothing changes."""
    from torch.distributed.tensor.debug import CommDebugMode

    model = fsdp_model(torch.bfloat16)
    opt = mplamb.Lamb(model.parameters(), **NO_CLIP)
    train(model, opt, 2, dtype=torch.bfloat16)
    x, y = data()
    opt.zero_grad()
    nn.functional.mse_loss(model(x.to(torch.bfloat16)).float(), y).backward()
    if dist.get_rank() == 1:
        model[0].weight.grad.to_local().view(-1)[0] = float("nan")
    before = [full(p) for p in model.parameters()]
    state_before = [{k: (full(v) if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
                    for p in model.parameters()]
    with CommDebugMode() as comm:
        opt.step()
    unchanged = all(torch.equal(a, full(b)) for a, b in zip(before, model.parameters()))
    for p, old in zip(model.parameters(), state_before):
        for k, v in opt.state[p].items():
            unchanged &= (torch.equal(old[k], full(v)) if isinstance(v, torch.Tensor) else old[k] == v)
    return {"unchanged": bool(unchanged), "skipped_steps": opt.skipped_steps,
            "total_collectives": comm.get_total_counts()}


def scenario_fsdp2_fp32_params_bf16_compute():
    """MixedPrecisionPolicy keeps fp32 sharded params: Lamb must not add a second master copy."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = make_model()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in (model[0], model[2]):
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = mplamb.Lamb(model.parameters(), **HP)
    train(model, opt, 2)
    return {"state_keys": sorted(opt.state[next(iter(model.parameters()))])}


def scenario_process_group():
    """Plain tensors sharded by hand (uneven 1-D slices of every parameter): process_group= sums the norms."""
    rank = dist.get_rank()
    full_model = make_model()

    def split(t):
        return torch.tensor_split(t.reshape(-1), 2)

    shards = [nn.Parameter(split(p.detach())[rank].clone()) for p in full_model.parameters()]
    opt = mplamb.Lamb(shards, process_group=dist.group.WORLD, **HP)
    x, y = data()
    for _ in range(STEPS):  # full gradients are computed everywhere; each rank steps its slices
        full_model.zero_grad()
        nn.functional.mse_loss(full_model(x), y).backward()
        for p, s in zip(full_model.parameters(), shards):
            s.grad = split(p.grad)[rank].clone()
        opt.step()
        for p, s in zip(full_model.parameters(), shards):  # reassemble the parameters from both slices
            parts = [t.clone() for t in split(p.detach())]
            for r in range(2):
                if r == rank:
                    parts[r] = s.detach().clone()
                if parts[r].numel():
                    dist.broadcast(parts[r], src=r)
            p.data.copy_(torch.cat(parts).reshape(p.shape))
    return {"max_diff": max_diff(full_model, reference()), "shard_sizes": [s.numel() for s in shards]}


LEAN_HP = dict(lr=0.05, weight_decay=0.01, moments="8bit", master_weights="kahan")  # no clip: one all-reduce
LEAN_MORE = 3  # steps after the lean scenario's checkpoint


def make_lean_model():
    """bf16 weights of >= 4096 elements (8-bit codes): (1, 4096), whose shard on rank 1 is empty, and (33, 129),
    rows split 17/16; the small ones ((129, 1), (1, 33), the biases) keep float32 moments."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4096, 1), nn.Tanh(), nn.Linear(1, 129), nn.Tanh(), nn.Linear(129, 33), nn.Tanh(),
                         nn.Linear(33, 1)).to(torch.bfloat16)


def lean_fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = make_lean_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def lean_backward(model, opt):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 4096, generator=g).to(torch.bfloat16), torch.randn(16, 1, generator=g)
    opt.zero_grad()
    nn.functional.mse_loss(model(x).float(), y).backward()


def lean_train(model, opt, steps):
    for _ in range(steps):
        lean_backward(model, opt)
        opt.step()


def effective_weights(model, opt):
    """Each parameter's effective weight ``p + c`` (its Kahan compensation added), whole, float64."""
    return [full(p) + (full(opt.state[p]["kahan_comp"]) if "kahan_comp" in opt.state[p] else 0.0)
            for p in model.parameters()]


def everything(model, opt):
    """Every parameter and state tensor, whole (collectives: the same order on every rank)."""
    out = [full(p) for p in model.parameters()]
    for p in model.parameters():
        out += [full(v) for _, v in sorted(opt.state[p].items())]
    return out


def lean_sharded_diff(ref_w, local_dither=False, **kw):
    """max |FSDP2 - one process| of the effective weights after STEPS steps; ``local_dither``: the second
    moment's dither indexed within each shard (the bug this guards against) instead of the whole parameter."""
    import mplamb.optimizer as mo

    saved = mo.dither_offset
    if local_dither:
        mo.dither_offset = lambda p: 0
    try:
        model = lean_fsdp_model()
        opt = mplamb.Lamb(model.parameters(), **LEAN_HP, **kw)
        lean_train(model, opt, STEPS)
    finally:
        mo.dither_offset = saved
    return max(float((a - b).abs().max()) for a, b in zip(effective_weights(model, opt), ref_w))


def scenario_fsdp2_lean():
    """FSDP2, bf16 weights, 8-bit moments and Kahan compensations: equal to one process (the second moment's
    dither indexes the whole parameter), one all-reduce a step, the state sharded like the parameters, a NaN
    on one shard skipped everywhere, and a torch.distributed.checkpoint checkpoint resumed bitwise."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode

    ref = make_lean_model()
    untrained = [full(p) for p in ref.parameters()]
    ref_opt = mplamb.Lamb(ref.parameters(), **LEAN_HP)
    lean_train(ref, ref_opt, STEPS)
    ref_w = effective_weights(ref, ref_opt)

    model = lean_fsdp_model()
    opt = mplamb.Lamb(model.parameters(), **LEAN_HP)
    lean_train(model, opt, STEPS - 1)
    lean_backward(model, opt)
    with CommDebugMode() as comm:
        opt.step()
    w = effective_weights(model, opt)
    out = {"max_diff": max(float((a - b).abs().max()) for a, b in zip(w, ref_w)),
           "max_moved": max(float((a - b).abs().max()) for a, b in zip(ref_w, untrained)),
           "total_collectives": comm.get_total_counts(),
           "comm_counts": {str(k): v for k, v in comm.get_comm_counts().items()},
           "local_sizes": [p.to_local().numel() for p in model.parameters()],
           "max_diff_reference_backend": lean_sharded_diff(ref_w, backend="reference"),
           "max_diff_local_dither": lean_sharded_diff(ref_w, local_dither=True)}
    layout = []  # the lean state of every parameter: DTensors placed like it, the local part its local rows
    for p in model.parameters():
        st = opt.state[p]
        for k in ("exp_avg", "exp_avg_sq", "exp_avg_scale", "exp_avg_sq_scale", "kahan_comp"):
            v = st.get(k)
            if v is None:
                continue
            dt = isinstance(v, DTensor)
            layout.append({"param": list(p.shape), "key": k, "dtype": str(v.dtype).replace("torch.", ""),
                           "dtensor": dt, "placements": dt and tuple(v.placements) == tuple(p.placements),
                           "local_shape": list(v.to_local().shape) if dt else None,
                           "param_local_shape": list(p.to_local().shape)})
    out["layout"] = layout

    # torch.distributed.checkpoint: save, train on (the uninterrupted run), load into a fresh sharded model
    # and optimizer, train the same steps: bitwise the same weights and state
    ckpt = os.path.join(OUT_DIR, "lean_ckpt")
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=ckpt)
    lean_train(model, opt, LEAN_MORE)
    uninterrupted = everything(model, opt)
    resumed = lean_fsdp_model()
    resumed_opt = mplamb.Lamb(resumed.parameters(), **LEAN_HP)
    sd = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, resumed_opt)}
    dcp.load(sd, checkpoint_id=ckpt)
    set_model_state_dict(resumed, sd["model"])
    set_optimizer_state_dict(resumed, resumed_opt, sd["optim"])
    lean_train(resumed, resumed_opt, LEAN_MORE)
    after = everything(resumed, resumed_opt)
    out["resumed_bitwise"] = len(after) == len(uninterrupted) and all(
        a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(after, uninterrupted))
    out["resumed_state_keys"] = sorted(resumed_opt.state[next(iter(resumed.parameters()))])

    # a NaN in rank 1's shard of the (33, 129) weight: every rank skips, weights and state bitwise unchanged
    lean_backward(model, opt)
    if dist.get_rank() == 1:
        model[4].weight.grad.to_local().view(-1)[0] = float("nan")
    before = everything(model, opt)
    with CommDebugMode() as comm:
        opt.step()
    out["nan_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, everything(model, opt)))
    out["nan_skipped_steps"] = int(opt.skipped_steps)
    out["nan_collectives"] = comm.get_total_counts()
    return out


def main():
    global OUT_DIR
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    OUT_DIR = out
    only = sys.argv[5].split(",") if len(sys.argv) > 5 else None
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("MPLAMB_DIST_TIMEOUT", "120")), exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for name, fn in [("ddp", scenario_ddp), ("zero1", scenario_zero1),
                     ("zero1_auto_group", lambda: scenario_zero1(explicit=False)),
                     ("fsdp2_capturable", scenario_fsdp2_capturable),
                     ("fsdp2_fp32", lambda: scenario_fsdp2(torch.float32)),
                     ("fsdp2_bf16", lambda: scenario_fsdp2(torch.bfloat16)),
                     ("fsdp2_local_norms", lambda: scenario_fsdp2(torch.float32, local_norms=True)),
                     ("fsdp2_fp32_no_clip", lambda: scenario_fsdp2(torch.float32, hp=NO_CLIP)),
                     ("fsdp2_fp32_loose_clip", lambda: scenario_fsdp2(torch.float32, hp=LOOSE_CLIP)),
                     ("fsdp2_bf16_tight_clip", lambda: scenario_fsdp2(torch.bfloat16, hp=TIGHT_CLIP)),
                     ("fsdp2_bf16_no_clip", lambda: scenario_fsdp2(torch.bfloat16, hp=NO_CLIP)),
                     ("fsdp2_local_norms_no_clip",
                      lambda: scenario_fsdp2(torch.float32, local_norms=True, hp=NO_CLIP)),
                     ("fsdp2_nan_on_one_shard", scenario_fsdp2_nan_on_one_shard),
                     ("fsdp2_mp_policy", scenario_fsdp2_fp32_params_bf16_compute),
                     ("process_group", scenario_process_group),
                     ("fsdp2_lean", scenario_fsdp2_lean)]:
        if only is not None and name not in only:
            continue
        try:
            results[name] = fn()
        except Exception as e:  # reported to the test, which fails with the message
            import traceback

            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            print(f"rank {rank} {name}: {results[name]['traceback']}", file=sys.stderr, flush=True)
        dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
