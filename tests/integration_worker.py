"""One process of the framework integration tests (launched by tests/test_integrations.py).

    python tests/integration_worker.py STACK PHASE OUT THREADS [RANK WORLD PORT]

STACK: ``hf`` (transformers Trainer), ``lightning``, ``fsdp2_dcp`` (FSDP2 + torch.distributed.checkpoint),
``zero`` (ZeroRedundancyOptimizer + DDP).  THREADS: ``1`` (``torch.set_num_threads(1)``) or ``default``.

PHASE ``train`` runs the uninterrupted N+M steps (results in ``OUT/full*.pt``), then a fresh N-step run that
saves its checkpoint in ``OUT/ckpt*``; PHASE ``resume`` loads that checkpoint, runs the last M steps and writes
``OUT/resumed*.pt``.  The test launches ``resume`` as a new process and compares the two results bit for bit.
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
STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "master_weight")


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


# ---------------------------------------------------------------------------------------------- main


def main():
    stack, phase, out, threads = sys.argv[1:5]
    if threads != "default":
        torch.set_num_threads(int(threads))
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("MPLAMB_INTEGRATION_TIMEOUT", "150")), exit=True)
    info = {"threads": torch.get_num_threads()}
    if stack == "hf":
        run_hf(phase, out)
    else:
        raise SystemExit(f"unknown stack {stack!r}")
    with open(os.path.join(out, f"{phase}_info.json"), "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
