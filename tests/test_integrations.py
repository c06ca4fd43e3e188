"""mplamb.Lamb inside real training stacks: transformers' Trainer, Lightning, FSDP2 + torch.distributed.checkpoint,
DDP and ZeroRedundancyOptimizer + DDP (the last three on 2 gloo CPU processes), and torch.compile of the model.

For every stack an uninterrupted run of N+M steps and a run of N steps that is saved and then resumed **in a fresh
process** for M more steps end with bit-identical weights and optimizer state (moments, fp32 masters, step counts),
once with ``torch.set_num_threads(1)`` and once with the default thread count.  The work is done by
tests/integration_worker.py: one ``train`` and then one fresh ``resume`` process per stack (and rank), each running
both thread settings in turn; each test reads what the processes wrote.  Tiny models built from configs, data
made in memory, nothing downloaded.  A stack whose package is not installed is skipped.  docs/integrations.md gives
the recipes these tests run.
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
import torch

WORKER = pathlib.Path(__file__).resolve().with_name("integration_worker.py")
THREADS = ["1", "default"]
THREAD_IDS = ["one_thread", "default_threads"]  # pytest -k one_thread
TIMEOUT = 240  # seconds per process (a run takes a few seconds)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "MPLAMB_INTEGRATION_TIMEOUT": str(TIMEOUT - 30)}
    env.pop("OMP_NUM_THREADS", None)  # "default" is torch's own thread count; "1" is set by the worker
    return env


def _launch(stack: str, phases: str, out: pathlib.Path, world: int = 1) -> None:
    """Run the worker for every thread setting (``world`` ranks over gloo on loopback); fail with its output if a
    process fails."""
    cmd = [sys.executable, str(WORKER), stack, phases, str(out), ",".join(THREADS)]
    opts = dict(env=_env(), cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # (writes: out)
    if world == 1:
        procs = [subprocess.Popen(cmd, **opts)]
    else:
        port = str(_free_port())
        procs = [subprocess.Popen(cmd + [str(r), str(world), port], **opts) for r in range(world)]
    try:
        logs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        if p.returncode != 0:
            raise RuntimeError(f"{stack} {phases} rank {r} exited {p.returncode}:\n{log[-4000:]}")


def _load(path: pathlib.Path) -> dict:
    return torch.load(path, weights_only=True)


def _assert_bitwise(full: dict, resumed: dict) -> None:
    a, b = full["tensors"], resumed["tensors"]
    assert sorted(a) == sorted(b)
    assert any(k.startswith("opt.") for k in a) and any(k.startswith("w.") for k in a)
    bad = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert not bad, f"differ after resuming: {bad}"


_CACHE: dict = {}


def _train_and_resume(tmp_path_factory, stack: str, threads: str, world: int = 1, extra: str = "") -> pathlib.Path:
    """One ``train`` process (per rank), then one fresh ``resume`` process (per rank), each running every thread
    setting in turn; once per stack and session.  Returns the folder of the ``threads`` setting."""
    if stack not in _CACHE:
        out = tmp_path_factory.mktemp(stack)
        try:
            _launch(stack, "train" + extra, out, world)
            _launch(stack, "resume", out, world)
        except (RuntimeError, subprocess.TimeoutExpired) as e:  # every test of the stack fails with it (once run)
            _CACHE[stack] = e
            raise
        _CACHE[stack] = out
    if isinstance(_CACHE[stack], Exception):
        raise _CACHE[stack]
    return _CACHE[stack] / threads


def _rank_info(out: pathlib.Path, phase: str, world: int = 2) -> list:
    return [json.loads((out / f"{phase}_rank{r}.json").read_text()) for r in range(world)]


def _threads_seen(threads: str, info: dict) -> None:
    """The worker ran with the thread count asked for (``default``: torch's, whatever the machine gives)."""
    assert info["threads"] == 1 if threads == "1" else info["threads"] >= 1


# ------------------------------------------------------------------------------------------ transformers Trainer


@pytest.mark.parametrize("threads", THREADS, ids=THREAD_IDS)
def test_trainer_resume_is_bitwise(tmp_path_factory, threads):
    """Trainer(optimizers=(Lamb(...), None)) on fp32 weights and Trainer(optimizer_cls_and_kwargs=(Lamb, {...}))
    on bf16 weights (fp32 masters in the checkpoint's optimizer.pt), both under bf16=True autocast on the CPU,
    with a linear warm-up/decay schedule and dropout: resume_from_checkpoint in a fresh process is bit-exact."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = _train_and_resume(tmp_path_factory, "hf", threads)
    for variant in ("optimizers", "cls_and_kwargs"):
        full, resumed = _load(out / f"full_{variant}.pt"), _load(out / f"resumed_{variant}.pt")
        _assert_bitwise(full, resumed)
        assert full["optimizer_type"] == resumed["optimizer_type"] == "Lamb"
        assert full["step"] == resumed["step"] == 6
        assert full["losses"] == resumed["losses"] and len(full["losses"]) == 6
        masters = [k for k in full["tensors"] if k.endswith(".master_weight")]
        if variant == "cls_and_kwargs":  # bf16 weights: fp32 masters went through torch.save/torch.load
            assert masters and all(full["tensors"][k].dtype == torch.float32 for k in masters)
            assert all(v.dtype == torch.bfloat16 for k, v in full["tensors"].items() if k.startswith("w."))
        else:
            assert not masters
    _threads_seen(threads, json.loads((out / "resume_info.json").read_text()))


# ------------------------------------------------------------------------------------------ Lightning


@pytest.mark.parametrize("threads", THREADS, ids=THREAD_IDS)
def test_lightning_resume_is_bitwise(tmp_path_factory, threads):
    """configure_optimizers returns Lamb(max_grad_norm=1.0) and a per-step LambdaLR; precision="bf16-mixed";
    the ModelCheckpoint of step 4 (an epoch's end) resumed with fit(ckpt_path=...) in a fresh process."""
    pytest.importorskip("lightning")
    out = _train_and_resume(tmp_path_factory, "lightning", threads, extra=",clip")
    full, resumed = _load(out / "full.pt"), _load(out / "resumed.pt")
    _assert_bitwise(full, resumed)
    assert full["step"] == resumed["step"] == 6 and full["lr"] == resumed["lr"]
    _threads_seen(threads, json.loads((out / "resume_info.json").read_text()))


def test_lightning_gradient_clip_val_is_refused_under_bf16_mixed(tmp_path_factory):
    """Lightning's mixed-precision plugin refuses Trainer(gradient_clip_val=...) for every optimizer that sets
    ``_step_supports_amp_scaling`` (it cannot unscale their gradients first), bf16 included: Lamb is treated as
    torch's AdamW(fused=True) is.  The recipe is Lamb(max_grad_norm=...) instead (the test above).  With
    precision="32-true" Lightning clips the gradients itself and Lamb steps."""
    pytest.importorskip("lightning")
    out = _train_and_resume(tmp_path_factory, "lightning", "1", extra=",clip")  # (the train process checks it)
    outcome = json.loads((out / "clip.json").read_text())
    for run, name in (("lamb bf16-mixed", "Lamb"), ("adamw_fused bf16-mixed", "AdamW")):
        err = outcome[run]["error"]
        assert err is not None and f"The current optimizer, {name}, does not allow for gradient clipping" in err
        assert outcome[run]["step"] == 0
    assert outcome["lamb 32-true"] == {"error": None, "step": 2}  # without mixed precision Lightning clips


# ------------------------------------------------------------------------------------------ FSDP2 + DCP

dist_only = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


@dist_only
@pytest.mark.parametrize("threads", THREADS, ids=THREAD_IDS)
def test_fsdp2_dcp_resume_is_bitwise_and_keeps_skipped_steps(tmp_path_factory, threads):
    """fully_shard on bf16 parameters, 2 gloo ranks; dcp.save of get_model_state_dict / get_optimizer_state_dict
    after 3 steps (one of them skipped: a NaN in rank 1's gradient shard), dcp.load + set_*_state_dict in fresh
    processes, 3 more steps: weights, sharded fp32 masters, moments and step counts bit-exact; skipped_steps
    (kept in param_groups[0], which DCP saves) is 1 after loading."""
    out = _train_and_resume(tmp_path_factory, "fsdp2_dcp", threads, world=2)
    full, resumed = _load(out / "full.pt"), _load(out / "resumed.pt")
    _assert_bitwise(full, resumed)
    assert any(k.endswith(".master_weight") for k in full["tensors"])
    train, resume = _rank_info(out, "train"), _rank_info(out, "resume")
    for t, r in zip(train, resume):
        assert t["full"]["skipped"] == t["saved_skipped"] == 1
        assert r["loaded_skipped"] == 1 and r["resumed"]["skipped"] == 1
        assert r["resumed"]["param_dtype"] == "torch.bfloat16"
        assert "master_weight:DTensor" in r["resumed"]["state_types"]
        _threads_seen(threads, r)


# ------------------------------------------------------------------------------------------ DDP, ZeRO-1 + DDP


@dist_only
@pytest.mark.parametrize("threads", THREADS, ids=THREAD_IDS)
def test_ddp_resume_is_bitwise_and_matches_one_process(tmp_path_factory, threads):
    """DDP with a whole Lamb(max_grad_norm=1.0) per rank, 2 gloo ranks with their own batches, a NaN in rank 1's
    batch on step 2 (the all-reduce spreads it: every rank skips); rank 0's torch.save of model and optimizer
    state dicts, loaded by every rank in fresh processes: bit-exact, and equal to one process stepping plain Lamb
    on both ranks' batches within float rounding."""
    out = _train_and_resume(tmp_path_factory, "ddp", threads, world=2)
    full, resumed = _load(out / "full_ddp.pt"), _load(out / "resumed_ddp.pt")
    _assert_bitwise(full, resumed)
    assert full["max_diff_vs_one_process"] <= 1e-6 and resumed["max_diff_vs_one_process"] <= 1e-6
    train, resume = _rank_info(out, "train"), _rank_info(out, "resume")
    for t, r in zip(train, resume):
        assert t["full_ddp"]["skipped"] == t["saved_skipped_ddp"] == 1
        assert r["loaded_skipped_ddp"] == 1 and r["resumed_ddp"]["skipped"] == 1
        assert t["full_ddp"]["partition_group"] == "None" and t["full_ddp"]["local_params"] == 6
        _threads_seen(threads, r)


@dist_only
@pytest.mark.parametrize("threads", THREADS, ids=THREAD_IDS)
def test_zero_resume_is_bitwise_and_matches_one_process(tmp_path_factory, threads):
    """ZeroRedundancyOptimizer(optimizer_class=Lamb, max_grad_norm=1.0) + DDP, 2 gloo ranks with their own
    batches, a NaN put into a gradient of rank 1's partition on step 2 (every rank skips it: Lamb found ZeRO's
    group itself); consolidate_state_dict + torch.save, load_state_dict in fresh processes: bit-exact, and equal
    to one process stepping plain Lamb on both ranks' batches within float rounding."""
    out = _train_and_resume(tmp_path_factory, "ddp", threads, world=2)
    full, resumed = _load(out / "full_zero.pt"), _load(out / "resumed_zero.pt")
    _assert_bitwise(full, resumed)
    assert full["max_diff_vs_one_process"] <= 1e-6 and resumed["max_diff_vs_one_process"] <= 1e-6
    train, resume = _rank_info(out, "train"), _rank_info(out, "resume")
    assert all(t["full_zero"]["partition_group"] != "None" for t in train)
    assert sum(t["full_zero"]["local_params"] for t in train) == 6 and all(t["full_zero"]["local_params"]
                                                                          for t in train)
    for t in train:  # the NaN was in rank 1's partition only: both ranks skipped the step
        assert t["full_zero"]["skipped"] == t["saved_skipped_zero"] == 1
    for r in resume:
        assert r["resumed_zero"]["skipped"] == 1
        _threads_seen(threads, r)


@dist_only
def test_zero_state_dict_carries_skipped_steps(tmp_path_factory):
    """ZeRO's load_state_dict alone gives the skip count back: Lamb keeps it in its live param_groups[0], which ZeRO
    copies between its param groups and Lamb's and puts in its consolidated state dict."""
    out = _train_and_resume(tmp_path_factory, "ddp", "1", world=2)
    for r in _rank_info(out, "resume"):
        assert r["loaded_skipped_zero"] == 1


# ------------------------------------------------------------------------------------------ torch.compile


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # (inductor's own use of torch.jit)
def test_torch_compile_of_the_model_with_lamb_outside():
    """torch.compile(model) (inductor) and Lamb stepping the original module's parameters: the same training as
    eager within float rounding (the compiled kernels may round differently), and no recompilation per step."""
    from torch import nn

    import mplamb

    def train(compiled):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 1))
        fwd = torch.compile(model) if compiled else model
        opt = mplamb.Lamb(mplamb.param_groups(model, weight_decay=0.01), lr=1e-2, max_grad_norm=1.0)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x, y = torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)
            opt.zero_grad()
            nn.functional.mse_loss(fwd(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()], opt

    torch._dynamo.reset()
    try:
        eager, _ = train(False)
        torch._dynamo.utils.counters.clear()
        compiled, opt = train(True)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opt.state and all(int(st["step"]) == 4 for st in opt.state.values())
    assert frames == 1, frames
