"""One process of the framework integration tests (launched by tests/test_integrations.py).

    python tests/integration_worker.py STACK PHASES OUT THREADS [RANK WORLD PORT]

STACK: ``hf`` (transformers Trainer), ``lightning``, ``fsdp2_dcp`` (FSDP2 + torch.distributed.checkpoint),
``ddp`` (DDP with a whole Lamb per rank, and DDP with ZeroRedundancyOptimizer; these two stacks as rank RANK of
WORLD over gloo on 127.0.0.1:PORT).
THREADS: comma-separated settings, each ``1`` (``torch.set_num_threads(1)``) or ``default`` (torch's own count),
run one after the other in folders ``OUT/<setting>``.  PHASES: comma-separated, run in order for each setting.

PHASE ``train`` runs the uninterrupted N+M steps (results in ``full*.pt``), then a fresh N-step run that saves
its checkpoint in ``ckpt*``; PHASE ``resume`` loads that checkpoint, runs the last M steps and writes
``resumed*.pt``.  The test launches ``resume`` as a new process and compares the two results bit for bit.
``lightning`` also has PHASE ``clip`` (Trainer(gradient_clip_val=...) with Lamb and fused AdamW under bf16-mixed,
and with Lamb under 32-true; outcomes in ``clip.json``).
Each result is a dict of CPU tensors (weights, optimizer state) plus a few numbers.  Nothing is downloaded:
models are built from configs, data is made in memory.
"""
from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

import mplamb

N, M = 3, 3  # steps before the checkpoint, steps after it
SEED = 1234


def _dump(path, tensors, **extra):
    torch.save({"tensors": {k: v.detach().cpu().clone() for k, v in tensors.items()}, **extra}, path)


def _opt_tensors(opt_state, names):
    """Optimizer state (a torch.optim-style state dict's "state") as flat named tensors."""
    out = {}
    for key, st in opt_state.items():
        name = names[key] if not isinstance(key, str) else key
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"opt.{name}.{k}"] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return out


# ---------------------------------------------------------------------------------------------- transformers


class _TokenData(torch.utils.data.Dataset):
    """Random token ids, made in memory (labels = inputs: causal language modelling)."""

    def __init__(self, n=16, length=12, vocab=64):
        g = torch.Generator().manual_seed(7)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_model(dtype):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                     eos_token_id=0)  # dropout 0.1 stays on
    return GPT2LMHeadModel(cfg).to(dtype)


LAMB_HF = dict(lr=2e-2, weight_decay=0.01, max_grad_norm=1.0)


def _hf_trainer(out_dir, variant, stop_at=None):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StopAt(TrainerCallback):  # an interruption right after the checkpoint of step `stop_at`
        def on_step_end(self, args, state, control, **kw):
            if stop_at is not None and state.global_step == stop_at:
                control.should_save = True
                control.should_training_stop = True

    args = TrainingArguments(
        output_dir=out_dir, max_steps=N + M, per_device_train_batch_size=4, learning_rate=LAMB_HF["lr"],
        weight_decay=LAMB_HF["weight_decay"], lr_scheduler_type="linear", warmup_steps=2, bf16=True, use_cpu=True,
        report_to=[], save_strategy="steps", save_steps=1000, logging_steps=1, dataloader_num_workers=0, seed=SEED,
        data_seed=SEED, max_grad_norm=0.0,  # clipping is the optimizer's (max_grad_norm=1.0), after any unscaling
        disable_tqdm=True)
    if variant == "optimizers":  # fp32 weights under bf16 autocast; the optimizer made by the caller
        model = _hf_model(torch.float32)
        kw = dict(optimizers=(mplamb.Lamb(mplamb.param_groups(model, weight_decay=LAMB_HF["weight_decay"]),
                                          **LAMB_HF), None))
    else:  # bf16 weights (Lamb keeps fp32 masters); the Trainer builds the optimizer from the class and kwargs
        model = _hf_model(torch.bfloat16)
        kw = dict(optimizer_cls_and_kwargs=(mplamb.Lamb, LAMB_HF))
    return Trainer(model=model, args=args, train_dataset=_TokenData(), callbacks=[StopAt()], **kw)


def _hf_result(trainer):
    names = {}
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # under accelerate's AcceleratedOptimizer
    pid = {id(p): n for n, p in trainer.model.named_parameters()}
    sd = opt.state_dict()
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        names[i] = pid[id(p)]
    tensors = {f"w.{n}": p for n, p in trainer.model.named_parameters()}
    tensors.update(_opt_tensors(sd["state"], names))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return tensors, dict(skipped=int(opt.skipped_steps), losses=losses, step=trainer.state.global_step,
                         lr=opt.param_groups[0]["lr"], optimizer_type=type(opt).__name__)


def run_hf(phase, out):
    for variant in ("optimizers", "cls_and_kwargs"):
        if phase == "train":
            t = _hf_trainer(os.path.join(out, f"hf_full_{variant}"), variant)
            t.train()
            tensors, extra = _hf_result(t)
            _dump(os.path.join(out, f"full_{variant}.pt"), tensors, **extra)
            t = _hf_trainer(os.path.join(out, f"ckpt_{variant}"), variant, stop_at=N)
            t.train()
            assert t.state.global_step == N, t.state.global_step
        else:
            t = _hf_trainer(os.path.join(out, f"ckpt_{variant}"), variant)
            t.train(resume_from_checkpoint=os.path.join(out, f"ckpt_{variant}", f"checkpoint-{N}"))
            tensors, extra = _hf_result(t)
            _dump(os.path.join(out, f"resumed_{variant}.pt"), tensors, **extra)


# ---------------------------------------------------------------------------------------------- Lightning


def _lightning_data():
    """16 (x, y) pairs, 4 batches of 4 per epoch, in a fixed order."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, 8, generator=g)
    y = x[:, :1] * 2 - x[:, 1:2] + 0.1 * torch.randn(16, 1, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=False,
                                       num_workers=0)


# Lightning resumes a plain DataLoader at an epoch boundary only (mid-epoch it restarts the epoch's batches and warns):
# the checkpoint is taken after the first epoch of 4 batches, then 2 more steps.
LN, LM = 4, 2


def _lightning_module(clip_in_optimizer=True, optimizer="lamb"):
    import lightning as L

    class TinyRegressor(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(SEED)
            self.net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.LayerNorm(32), nn.Linear(32, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x).float(), y)

        def configure_optimizers(self):
            if optimizer == "adamw_fused":
                return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)
            opt = mplamb.Lamb(mplamb.param_groups(self.net, weight_decay=0.01), lr=2e-2,
                              max_grad_norm=1.0 if clip_in_optimizer else None)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))  # warm-up, per step
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return TinyRegressor()


def _lightning_trainer(max_steps, root, checkpoint_every=None, **kw):
    """A CPU Trainer writing only under ``root``; with ``checkpoint_every``, a ModelCheckpoint every so many steps
    in ``root/ckpt`` (otherwise Lightning's default one, at epoch ends, in ``root/checkpoints``)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = []
    if checkpoint_every is not None:
        callbacks.append(ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), filename="{step}",
                                         every_n_train_steps=checkpoint_every, save_top_k=-1,
                                         save_on_train_epoch_end=False))
    kw.setdefault("precision", "bf16-mixed")
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, default_root_dir=root,
                     enable_checkpointing=True, logger=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=callbacks, deterministic=True, **kw)


def _lightning_result(module, trainer):
    opt = trainer.optimizers[0]
    names = {i: n for i, (n, _) in enumerate(
        (n, p) for g in opt.param_groups for p in g["params"] for n in [_param_name(module, p)])}
    tensors = {f"w.{n}": p for n, p in module.named_parameters()}
    tensors.update(_opt_tensors(opt.state_dict()["state"], names))
    return tensors, dict(skipped=int(opt.skipped_steps), step=trainer.global_step, lr=opt.param_groups[0]["lr"])


def _param_name(module, p):
    return next(n for n, q in module.named_parameters() if q is p)


def run_lightning(phase, out):
    import lightning as L

    L.seed_everything(SEED, verbose=False)
    if phase == "train":
        module = _lightning_module()
        trainer = _lightning_trainer(LN + LM, os.path.join(out, "full"))
        trainer.fit(module, _lightning_data())
        tensors, extra = _lightning_result(module, trainer)
        _dump(os.path.join(out, "full.pt"), tensors, **extra)
        module = _lightning_module()
        trainer = _lightning_trainer(LN, out, checkpoint_every=LN)
        trainer.fit(module, _lightning_data())
    elif phase == "resume":
        module = _lightning_module()
        trainer = _lightning_trainer(LN + LM, out, checkpoint_every=LN)  # the same callbacks
        trainer.fit(module, _lightning_data(), ckpt_path=os.path.join(out, "ckpt", f"step={LN}.ckpt"))
        tensors, extra = _lightning_result(module, trainer)
        _dump(os.path.join(out, "resumed.pt"), tensors, **extra)
    elif phase == "clip":  # Trainer(gradient_clip_val=...) under bf16-mixed, with Lamb and with fused AdamW
        outcome = {}
        for optimizer, precision in (("lamb", "bf16-mixed"), ("adamw_fused", "bf16-mixed"), ("lamb", "32-true")):
            module = _lightning_module(clip_in_optimizer=False, optimizer=optimizer)
            trainer = _lightning_trainer(2, os.path.join(out, "clip"), gradient_clip_val=1.0, precision=precision)
            try:
                trainer.fit(module, _lightning_data())
                outcome[f"{optimizer} {precision}"] = {"error": None, "step": trainer.global_step}
            except RuntimeError as e:
                outcome[f"{optimizer} {precision}"] = {"error": str(e), "step": trainer.global_step}
        with open(os.path.join(out, "clip.json"), "w") as f:
            json.dump(outcome, f)


# ---------------------------------------------------------------------------------------------- distributed

NAN_STEP = 1  # (< N) rank 1 puts a NaN into one gradient of its own: every rank must skip this step
LAMB_DIST = dict(lr=2e-2, weight_decay=0.01, max_grad_norm=1.0)


def _mlp(dtype):
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 1)).to(dtype)


def _batch(step, rank):
    """This rank's batch of `step` (each rank its own: data parallel)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 8, generator=g)
    return x, x[:, :1] - 0.5 * x[:, 1:2] + 0.1 * torch.randn(4, 1, generator=g)


def _train_steps(model, opt, start, stop, rank, dtype, nan_grad=None, nan_input=False):
    """Steps ``start`` to ``stop - 1``; on NAN_STEP rank 1 puts a NaN into its batch (``nan_input``) or, after the
    backward pass, into the gradient ``nan_grad()`` returns."""
    for step in range(start, stop):
        opt.zero_grad()
        x, y = _batch(step, rank)
        if step == NAN_STEP and rank == 1 and nan_input:
            x[0, 0] = float("nan")
        nn.functional.mse_loss(model(x.to(dtype)).float(), y).backward()
        if step == NAN_STEP and rank == 1 and nan_grad is not None:
            nan_grad().view(-1)[0] = float("nan")
        opt.step()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _fsdp2_model():
    from torch.distributed.fsdp import fully_shard

    model = _mlp(torch.bfloat16)  # bf16 parameters: Lamb keeps fp32 masters, sharded like them (DTensors)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def run_fsdp2_dcp(phase, out, rank):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    def nan_grad():  # a gradient shard this rank holds (non-empty)
        return next(p.grad.to_local() for p in model.parameters() if p.grad.to_local().numel())

    def result(name):
        names = {id(p): n for n, p in model.named_parameters()}
        tensors = {f"w.{n}": _full(p) for n, p in model.named_parameters()}  # (collectives: same order everywhere)
        for p in model.parameters():
            for k, v in opt.state[p].items():
                tensors[f"opt.{names[id(p)]}.{k}"] = _full(v)
        info = {"skipped": int(opt.skipped_steps), "param_dtype": str(next(model.parameters()).dtype),
                "state_types": sorted({f"{k}:{type(v).__name__}" for st in opt.state.values() for k, v in st.items()})}
        if rank == 0:
            _dump(os.path.join(out, f"{name}.pt"), tensors, **info)
        return info

    ckpt = os.path.join(out, "ckpt")
    infos = {}
    if phase == "train":
        model = _fsdp2_model()
        opt = mplamb.Lamb(model.parameters(), **LAMB_DIST)
        _train_steps(model, opt, 0, N + M, rank, torch.bfloat16, nan_grad=nan_grad)
        infos["full"] = result("full")
        model = _fsdp2_model()
        opt = mplamb.Lamb(model.parameters(), **LAMB_DIST)
        _train_steps(model, opt, 0, N, rank, torch.bfloat16, nan_grad=nan_grad)
        infos["saved_skipped"] = int(opt.skipped_steps)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=ckpt)
    else:  # a fresh process: the same model and optimizer, then the checkpoint into them
        model = _fsdp2_model()
        opt = mplamb.Lamb(model.parameters(), **LAMB_DIST)
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=ckpt)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        infos["loaded_skipped"] = int(opt.skipped_steps)
        _train_steps(model, opt, N, N + M, rank, torch.bfloat16, nan_grad=nan_grad)
        infos["resumed"] = result("resumed")
    dist.barrier()
    return infos


def run_ddp(phase, out, rank):
    """Variant ``ddp``: DDP and a whole Lamb on every rank, rank 0 saves ``opt.state_dict()``; a NaN in rank 1's
    batch (DDP's all-reduce spreads it to every rank's gradients).  Variant ``zero``: DDP and
    ZeroRedundancyOptimizer(optimizer_class=Lamb), ``consolidate_state_dict`` then rank 0 saves; a NaN put into a
    gradient of rank 1's own partition after the all-reduce (only Lamb's agreement over ZeRO's group makes rank 0
    skip too)."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    def make(variant, state=None):
        module = _mlp(torch.float32)
        if state is not None:
            module.load_state_dict(state)
        model = DDP(module)
        if variant == "ddp":
            return model, mplamb.Lamb(model.parameters(), **LAMB_DIST)
        # Lamb finds ZeRO's process group itself: clipping and the skip are agreed over the partitions
        return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=mplamb.Lamb, **LAMB_DIST)

    def local(opt):  # the Lamb of this rank
        return getattr(opt, "optim", opt)

    def state_dict(opt):  # the whole optimizer's state dict, on rank 0 (collective for ZeRO)
        if isinstance(opt, ZeroRedundancyOptimizer):
            opt.consolidate_state_dict(to=0)
        return opt.state_dict() if rank == 0 else None

    def result(variant, model, opt, name):
        sd = state_dict(opt)
        info = {"skipped": int(local(opt).skipped_steps), "partition_group": str(local(opt).partition_group),
                "local_params": len(local(opt).param_groups[0]["params"])}
        if rank == 0:
            names = dict(enumerate(n for n, _ in model.module.named_parameters()))
            tensors = {f"w.{n}": p for n, p in model.module.named_parameters()}
            tensors.update(_opt_tensors(sd["state"], names))
            ref = _one_process_reference()
            info["max_diff_vs_one_process"] = max(float((a.detach().double() - b.detach().double()).abs().max())
                                                  for a, b in zip(model.module.parameters(), ref.parameters()))
            _dump(os.path.join(out, f"{name}_{variant}.pt"), tensors, **info)
        return info

    infos = {}
    for variant in ("ddp", "zero"):
        ckpt = os.path.join(out, f"ckpt_{variant}.pt")
        how = dict(nan_input=True) if variant == "ddp" else dict(
            nan_grad=lambda: local(opt).param_groups[0]["params"][0].grad)  # (in rank 1's own partition)
        if phase == "train":
            model, opt = make(variant)
            _train_steps(model, opt, 0, N + M, rank, torch.float32, **how)
            infos[f"full_{variant}"] = result(variant, model, opt, "full")
            model, opt = make(variant)
            _train_steps(model, opt, 0, N, rank, torch.float32, **how)
            infos[f"saved_skipped_{variant}"] = int(local(opt).skipped_steps)
            sd = state_dict(opt)
            if rank == 0:  # (Lamb's skip counter travels inside the optimizer state dict, ZeRO's too)
                torch.save({"model": model.module.state_dict(), "optim": sd}, ckpt)
        else:  # fresh processes: every rank loads rank 0's file
            sd = torch.load(ckpt, map_location="cpu", weights_only=True)
            model, opt = make(variant, sd["model"])
            opt.load_state_dict(sd["optim"])  # ZeRO: every rank takes its partition's state
            infos[f"loaded_skipped_{variant}"] = int(local(opt).skipped_steps)
            _train_steps(model, opt, N, N + M, rank, torch.float32, **how)
            infos[f"resumed_{variant}"] = result(variant, model, opt, "resumed")
        dist.barrier()
    return infos


def _one_process_reference():
    """One process, plain Lamb, both ranks' batches at once (the same mean gradient), the NaN step skipped."""
    model = _mlp(torch.float32)
    opt = mplamb.Lamb(model.parameters(), **LAMB_DIST)
    for step in range(N + M):
        opt.zero_grad()
        xs, ys = zip(*(_batch(step, r) for r in range(2)))
        nn.functional.mse_loss(model(torch.cat(xs)), torch.cat(ys)).backward()
        if step == NAN_STEP:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        opt.step()
    assert opt.skipped_steps == 1
    return model


# ---------------------------------------------------------------------------------------------- main


def main():
    stack, phases, out, threads = sys.argv[1:5]
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("MPLAMB_INTEGRATION_TIMEOUT", "150")), exit=True)
    default_threads = torch.get_num_threads()
    rank = None
    if stack in ("fsdp2_dcp", "ddp"):
        import torch.distributed as dist

        rank, world, port = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    runs = {"hf": run_hf, "lightning": run_lightning, "fsdp2_dcp": run_fsdp2_dcp, "ddp": run_ddp}
    if stack not in runs:
        raise SystemExit(f"unknown stack {stack!r}")
    for t in threads.split(","):  # each setting in its own folder: OUT/1, OUT/default
        torch.set_num_threads(default_threads if t == "default" else int(t))
        sub = os.path.join(out, t)
        os.makedirs(sub, exist_ok=True)
        for phase in phases.split(","):
            info = {"threads": torch.get_num_threads()}
            if rank is None:
                runs[stack](phase, sub)
                name = f"{phase}_info.json"
            else:
                info.update(runs[stack](phase, sub, rank))
                name = f"{phase}_rank{rank}.json"
            with open(os.path.join(sub, name), "w") as f:
                json.dump(info, f)
    if rank is not None:
        # No rank tears down its gloo connections while the other may still use them: a rank that closed first
        # has aborted its peer ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
