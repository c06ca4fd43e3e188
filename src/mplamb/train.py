"""The main job: train a small byte-level transformer LM with ``mplamb.Lamb`` and report on it.

``python -m mplamb train`` (see ``--help``) trains :class:`~mplamb.demo.model.TinyGPT` on
Python's standard-library source (or ``--data FILE``) with bf16 weights and fp32 master
weights in the optimizer, shows a progress bar, checkpoints (``--resume`` continues bit for
bit; Ctrl-C saves first), optionally trains the same budget with ``torch.optim.AdamW``
(``--compare adamw``: fp32 weights, the same compute precision), and writes a report folder:
``loss.png``, ``trust_ratio.png``, ``metrics.csv``, ``metrics.json`` and ``summary.md``.

``--precision auto`` is decided from what the processor is (its instruction-set flags), never
from timings, so the same command on the same machine always trains the same way; ``--resume``
takes the precision its checkpoint was written with.  Throughput is reported apart from warm-up
(compiling the fused kernels, the first step).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import pathlib
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.nn import functional as F

from ._memory import PeakMemory
from .demo.data import Corpus, load_corpus
from .demo.model import GPTConfig, TinyGPT
from .optimizer import Lamb
from .param_groups import param_groups

__all__ = ["TrainConfig", "train", "add_train_arguments", "run_from_args", "CheckpointError", "resolve_precision",
           "precision_decision", "cpu_flags", "missing_report_packages"]

CKPT_FORMAT = "mplamb-train-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (corrupt, not ours, or from another configuration)."""


@dataclass
class TrainConfig:
    optimizer: str = "lamb"
    steps: int = 400
    batch_size: int = 32
    lr: float = 3e-2
    warmup: int = 40
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    context: int = 128
    layers: int = 4
    dim: int = 128
    heads: int = 4
    precision: str = "bf16-weights"
    eval_every: int = 50
    eval_batches: int = 8
    data: Optional[str] = None
    device: str = "cpu"
    moments: str = "fp32"  # LAMB's moment storage: fp32, bf16, 8bit, 4bit (Lamb(moments=...))
    master_weights: str = "fp32"  # LAMB's bf16 weights: fp32 masters, kahan compensation, or none

    def model_config(self) -> GPTConfig:
        return GPTConfig(context=self.context, layers=self.layers, dim=self.dim, heads=self.heads)

    @property
    def name(self) -> str:
        """The run's name in reports and checkpoint files: the optimizer, and LAMB's lean storage if any."""
        if self.optimizer != "lamb" or (self.moments, self.master_weights) == ("fp32", "fp32"):
            return self.optimizer
        return f"lamb-{self.moments}-{self.master_weights}"

    # keys a checkpoint must agree on to be resumed
    RESUME_KEYS = ("optimizer", "steps", "batch_size", "lr", "warmup", "weight_decay", "max_grad_norm", "seed",
                   "context", "layers", "dim", "heads", "precision", "eval_every", "eval_batches", "data", "moments",
                   "master_weights")


MASTER_WEIGHTS = {"fp32": None, "kahan": "kahan", "none": False}  # --master-weights -> Lamb(master_weights=...)


# x86 flags (Linux /proc/cpuinfo names) of the bf16 matrix units with which bf16 autocast trains faster than fp32.
# avx512_bf16 alone (dot-product instructions, no AMX) is not enough: on a Xeon with avx512_bf16 and no AMX a
# training step of the default model took 0.283 s under bf16 autocast against 0.138 s in fp32 (torch 2.13).
FAST_BF16_FLAGS = ("amx_bf16",)


def cpu_flags() -> str:
    """The processor's instruction-set flags as Linux lists them (the ``flags`` line of ``/proc/cpuinfo``
    on x86, ``Features`` on Arm); ``""`` where there is no such file (other systems)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return value.strip()
    return ""


def precision_decision(precision: str, device: str, flags: Optional[str] = None) -> Tuple[str, str]:
    """The precision to train with for ``--precision precision`` and why, in words.

    ``auto`` is decided from what the hardware is, never from timings, so that it is the same
    on a busy machine and on an idle one: on CPU, ``bf16`` where the processor has bf16 matrix
    units (a flag of ``FAST_BF16_FLAGS`` among ``flags``, by default :func:`cpu_flags`), which
    oneDNN's bf16 matmuls use; elsewhere bf16 autocast trains slower than fp32 (2x with
    avx512_bf16 only, 6-16x for matmuls with AVX2 only), so ``bf16-weights`` (bf16 weights, fp32
    compute).  On CUDA, ``bf16`` from compute capability 8.0 (bf16 tensor cores), else
    ``bf16-weights``.
    """
    if precision != "auto":
        return precision, "as asked"
    if torch.device(device).type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 0):
            return "bf16", f"auto: compute capability {major}.{minor} has bf16 tensor cores"
        return "bf16-weights", f"auto: compute capability {major}.{minor} has no bf16 tensor cores"
    if torch.device(device).type != "cpu":
        return "bf16-weights", f"auto: no rule for {device}, the safe choice"
    have = set((cpu_flags() if flags is None else flags).split())
    found = [f for f in FAST_BF16_FLAGS if f in have]
    if found:
        return "bf16", f"auto: the CPU has {found[0]}, bf16 matrix units"
    return "bf16-weights", f"auto: the CPU has no {' or '.join(FAST_BF16_FLAGS)}, so bf16 compute would be slower"


def resolve_precision(precision: str, device: str, flags: Optional[str] = None) -> str:
    """The precision of :func:`precision_decision` without its reason."""
    return precision_decision(precision, device, flags)[0]


def checkpoint_precision(path: pathlib.Path) -> Optional[str]:
    """The precision the checkpoint at ``path`` was trained with; None if there is no usable one (the
    resume itself then reports why)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        return None
    value = ckpt.get("config", {}).get("precision")
    return value if value in ("bf16", "bf16-weights", "fp32") else None


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up over ``cfg.warmup`` steps, then cosine decay to 10% at ``cfg.steps``."""
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


class _Run:
    """Model, optimizer, schedule and data stream of one training run."""

    def __init__(self, cfg: TrainConfig, corpus: Corpus) -> None:
        self.cfg = cfg
        self.corpus = corpus
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        model = TinyGPT(cfg.model_config())
        lamb = cfg.optimizer == "lamb"
        # LAMB: bf16 weights, fp32 masters in the optimizer.  AdamW (torch.optim): fp32 weights, as its users run
        # it.  Both compute alike (see loss): bf16 autocast for "bf16", fp32 otherwise.
        self.param_dtype = torch.bfloat16 if (lamb and cfg.precision != "fp32") else torch.float32
        self.model = model.to(self.device, self.param_dtype)
        if lamb:
            self.opt = Lamb(param_groups(self.model, weight_decay=cfg.weight_decay), lr=cfg.lr,
                            max_grad_norm=cfg.max_grad_norm, moments=cfg.moments,
                            master_weights=MASTER_WEIGHTS[cfg.master_weights])
        else:
            self.opt = torch.optim.AdamW(param_groups(self.model, weight_decay=cfg.weight_decay), lr=cfg.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg))
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        names = {id(p): n for n, p in self.model.named_parameters()}
        self.param_names = [names[id(p)] for g in self.opt.param_groups for p in g["params"]]
        self.history: Dict[str, Any] = {"steps": [], "tokens": [], "train_loss": [], "lr": [], "grad_norm": [],
                                        "val_steps": [], "val_loss": [], "trust_ratio": [],
                                        "param_names": self.param_names, "skipped_steps": 0, "wall_s": 0.0,
                                        "warmup_s": 0.0, "timed_steps": 0, "timed_s": 0.0,
                                        "precision": self.precision()}
        self.compute_dtype: Optional[torch.dtype] = None  # of the logits of the last forward pass

    def precision(self) -> Dict[str, Any]:
        """The run's precision policy: ``--precision``, the compute (autocast or not), the weights' dtype
        and the optimizer's master weights."""
        compute = "bf16 autocast" if self.cfg.precision == "bf16" else "fp32"
        lamb = isinstance(self.opt, Lamb)
        masters = None
        if lamb and self.param_dtype != torch.float32:
            masters = {"fp32": "fp32", "kahan": "Kahan-compensated", "none": None}[self.cfg.master_weights]
        return {"policy": self.cfg.precision, "compute": compute, "weights": _short(self.param_dtype),
                "masters": masters, "moments": self.cfg.moments if lamb else "fp32"}

    def memory(self) -> Dict[str, float]:
        """Bytes of the training state, counted from the tensors: weights, gradients (as allocated at the
        end of a step) and the optimizer's state, and the optimizer state per parameter."""
        params = sum(p.numel() for p in self.model.parameters())
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        grads = sum(p.grad.numel() * p.grad.element_size() for p in self.model.parameters() if p.grad is not None)
        state = 0
        for st in self.opt.state.values():
            state += sum(v.numel() * v.element_size() for k, v in st.items()
                         if isinstance(v, torch.Tensor) and k != "step")
        return {"params": float(params), "weight_bytes": float(weights), "grad_bytes": float(grads),
                "state_bytes": float(state), "state_bytes_per_param": state / params if params else 0.0,
                "training_state_bytes": float(weights + grads + state)}

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = x.to(self.device), y.to(self.device)
        if self.cfg.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                logits = self.model(x)
        elif self.param_dtype != torch.float32:  # bf16 weights, fp32 compute (CPUs without fast bf16)
            params = {n: p.float() for n, p in self.model.named_parameters()}
            logits = torch.func.functional_call(self.model, params, (x,))
        else:
            logits = self.model(x)
        self.compute_dtype = logits.dtype
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def train_step(self) -> float:
        x, y = self.corpus.batch("train", self.cfg.batch_size, self.cfg.context, self.gen)
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(x, y)
        loss.backward()
        if isinstance(self.opt, Lamb):
            self.opt.step()
            grad_norm = float(self.opt.last_grad_norm) if self.opt.last_grad_norm is not None else float("nan")
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm))
            self.opt.step()
        lr = self.opt.param_groups[0]["lr"]
        self.sched.step()
        self.step += 1
        h = self.history
        h["steps"].append(self.step)
        h["tokens"].append(self.step * self.cfg.batch_size * self.cfg.context)
        h["train_loss"].append(float(loss.detach()))
        h["lr"].append(lr)
        h["grad_norm"].append(grad_norm)
        if isinstance(self.opt, Lamb):
            h["trust_ratio"].append([float(v) for v in self.opt.last_step_stats()["trust_ratio"].tolist()])
            h["skipped_steps"] = int(self.opt.skipped_steps)
        return h["train_loss"][-1]

    @torch.no_grad()
    def evaluate(self) -> float:
        gen = torch.Generator().manual_seed(self.cfg.seed + 2)  # the same validation batches every time
        losses = [float(self.loss(*self.corpus.batch("val", self.cfg.batch_size, self.cfg.context, gen)))
                  for _ in range(self.cfg.eval_batches)]
        value = sum(losses) / len(losses)
        self.history["val_steps"].append(self.step)
        self.history["val_loss"].append(value)
        return value

    # -------------------------------------------------------------- checkpoints

    def save(self, path: pathlib.Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save({"format": CKPT_FORMAT, "config": dataclasses.asdict(self.cfg), "step": self.step,
                    "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(), "data_rng": self.gen.get_state(),
                    "history": self.history}, tmp)
        os.replace(tmp, path)

    def load(self, path: pathlib.Path) -> None:
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=True)
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint to resume at {path}") from None
        except Exception as e:  # truncated, not a torch file, ...
            raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
            raise CheckpointError(f"{path} is not an mplamb training checkpoint (format {CKPT_FORMAT!r})")
        saved = {"moments": "fp32", "master_weights": "fp32", **ckpt.get("config", {})}  # (their defaults)
        mine = dataclasses.asdict(self.cfg)
        diff = [f"{k}: checkpoint {saved.get(k)!r}, now {mine[k]!r}" for k in TrainConfig.RESUME_KEYS
                if saved.get(k) != mine[k]]
        if diff:
            raise CheckpointError(f"{path} was written with another configuration; resume with the same "
                                  "arguments or start a new --out folder. Differences: " + "; ".join(diff))
        try:
            self.model.load_state_dict(ckpt["model"])
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            self.gen.set_state(ckpt["data_rng"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path} does not fit this model/optimizer: {e}") from None
        self.step = int(ckpt["step"])
        self.history = ckpt["history"]
        for key, value in (("warmup_s", 0.0), ("timed_steps", 0), ("timed_s", 0.0), ("precision", self.precision())):
            self.history.setdefault(key, value)  # checkpoints written before these were kept

    def uses_fused_cpu(self) -> bool:
        """Whether the optimizer steps with the fused CPU kernels (numba), which compile on first use."""
        if not isinstance(self.opt, Lamb) or self.device.type != "cpu":
            return False
        from .kernels import resolve_backend_name

        return resolve_backend_name(self.opt.param_groups[0]["backend"], self.device) == "fused_cpu"

    def warm_up(self) -> None:
        """Compile (or load from numba's disk cache) the fused kernels for this run's dtypes at step
        counts that take every bias-correction case met from step 1 to ``cfg.steps`` (at t = 356 the
        mean's correction becomes exactly 1 at beta1 = 0.9, a loop of its own; see
        :func:`mplamb.kernels.fused_cpu.warm_up`), so that no compilation happens during training."""
        from .kernels import fused_cpu

        last = max(1, self.cfg.steps)
        fused_cpu.warm_up(dtypes=(self.param_dtype,), steps=tuple(sorted({1, min(last, 1000), last})))


def train(cfg: TrainConfig, corpus: Corpus, out: Optional[pathlib.Path] = None, *, resume: bool = False,
          ckpt_every: int = 100, progress: bool = True, stop_after: Optional[int] = None,
          log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Train one run; returns its history (also checkpointed under ``out``).

    ``stop_after`` ends the run early (after that many steps in total) as an interruption would,
    leaving a checkpoint to ``resume`` from.

    Timing: ``warmup_s`` is what each session spends before its steady state, compiling the fused
    kernels ahead of the first step (:meth:`_Run.warm_up`) and the first step itself (torch's
    one-time set-up); ``tokens_per_s`` counts only the training steps after it (``timed_steps``
    in ``timed_s``; evaluations and checkpoints are not training), so compilation never passes for
    training speed.  ``wall_s`` is everything.
    """
    device = torch.device(cfg.device)
    # peak memory: on a GPU the allocator's peak above what was allocated before the model was built; on the
    # CPU (resident memory, where a process's one-time allocations would swamp the model's) the training state
    # counted from the tensors plus the largest resident growth within the steady-state training steps
    whole_run = PeakMemory(device).start() if device.type == "cuda" else None
    steps_only = PeakMemory(device)
    run = _Run(cfg, corpus)
    ckpt = out / f"checkpoint-{cfg.name}.pt" if out is not None else None
    if resume:
        if ckpt is None:
            raise CheckpointError("--resume needs an --out folder holding a checkpoint")
        run.load(ckpt)
        log(f"resumed {cfg.name} from {ckpt} at step {run.step}")
    interrupted = {"flag": False}

    def on_sigint(signum, frame):  # finish the current step, then save and stop
        interrupted["flag"] = True

    h = run.history
    start = time.perf_counter()
    wall0 = h["wall_s"]
    if run.step < cfg.steps:
        if run.uses_fused_cpu():
            log(f"{cfg.name}: compiling the fused CPU kernels ahead of training (numba; loaded from its "
                "disk cache after the first time) ...")
            run.warm_up()
        h["warmup_s"] += time.perf_counter() - start
    old_handler = signal.signal(signal.SIGINT, on_sigint) if _main_thread() else None
    bar = _bar(progress, cfg, run.step)
    first_step = run.step
    session = {"steps": 0, "s": 0.0}  # this session's timed steps
    tokens_per_step = cfg.batch_size * cfg.context
    try:
        if run.step == 0:
            run.evaluate()
        while run.step < cfg.steps:
            t0 = time.perf_counter()
            loss = run.train_step()
            dt = time.perf_counter() - t0
            if run.step - 1 == first_step:
                h["warmup_s"] += dt
                if whole_run is None:
                    steps_only.start()  # after the first step's one-time set-up (warm-up, as for the timing)
            else:
                h["timed_steps"] += 1
                h["timed_s"] += dt
                session["steps"] += 1
                session["s"] += dt
            if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                run.evaluate()
            h["wall_s"] = wall0 + time.perf_counter() - start
            if bar is not None:
                rate = session["steps"] * tokens_per_step / session["s"] if session["s"] > 0 else float("nan")
                bar.set_postfix(loss=f"{loss:.3f}", val=f"{h['val_loss'][-1]:.3f}", tok_s=f"{rate:.0f}")
                bar.update(1)
            if ckpt is not None and (run.step % ckpt_every == 0 or run.step == cfg.steps):
                run.save(ckpt)
            if interrupted["flag"] or (stop_after is not None and run.step >= stop_after):
                if ckpt is not None:
                    run.save(ckpt)
                if interrupted["flag"]:
                    raise KeyboardInterrupt
                break
    finally:
        if bar is not None:
            bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    h = run.history
    h["wall_s"] = wall0 + time.perf_counter() - start
    h["tokens_per_s"] = h["timed_steps"] * tokens_per_step / h["timed_s"] if h["timed_s"] > 0 else None
    h["compute_dtype"] = _short(run.compute_dtype) if run.compute_dtype is not None else None
    h["config"] = dataclasses.asdict(cfg)
    h["memory"] = run.memory()
    if whole_run is not None:
        extra = whole_run.extra_bytes()
    else:
        transient = steps_only.extra_bytes()
        extra = None if transient is None else h["memory"]["training_state_bytes"] + transient
    if extra is not None:  # a resumed run: the larger of its sessions' peaks
        h["peak_bytes"] = max(extra, h.get("peak_bytes") or 0.0)
    h["memory"]["peak_bytes"] = h.get("peak_bytes")
    h["final_state"] = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    return h


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _bar(progress: bool, cfg: TrainConfig, initial: int):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=cfg.steps, initial=initial, desc=cfg.name, unit="step", dynamic_ncols=True)


# ------------------------------------------------------------------ command line

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of LAMB (after warm-up)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps (then cosine decay to 10%%)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="weight decay (biases and LayerNorm weights excluded)")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="global gradient-norm clipping")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the model initialisation and the data order")
    p.add_argument("--context", type=int, default=d.context, help="bytes per training sequence")
    p.add_argument("--layers", type=int, default=d.layers, help="transformer blocks")
    p.add_argument("--dim", type=int, default=d.dim, help="model width")
    p.add_argument("--heads", type=int, default=d.heads, help="attention heads")
    p.add_argument("--precision", choices=["auto", "bf16", "bf16-weights", "fp32"], default="auto",
                   help="bf16: bf16 weights and bf16 autocast compute; bf16-weights: bf16 weights, fp32 compute "
                        "(for CPUs without bf16 matrix units); fp32: no mixed precision. LAMB keeps fp32 "
                        "master weights for bf16 weights. auto: bf16 where the processor has bf16 matrix "
                        "units (CPU flag amx_bf16; CUDA compute capability 8.0+), else "
                        "bf16-weights; with --resume, the precision of the checkpoint")
    p.add_argument("--moments", choices=["fp32", "bf16", "8bit", "4bit"], default="fp32",
                   help="LAMB's moment storage (Lamb(moments=...)): fp32 (8 B/param), bf16 (4), 8bit (2.03: block-wise "
                        "codes, tensors of 4096+ elements), 4bit (1.06; lossy, see docs/lean_state.md)")
    p.add_argument("--master-weights", choices=["fp32", "kahan", "none"], default="fp32",
                   help="LAMB's bf16 weights: fp32 master copies (4 B/param), kahan (a bf16 compensation, 2 B/param) "
                        "or none (the bf16 weight alone)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validation evaluations")
    p.add_argument("--eval-batches", type=int, default=d.eval_batches, help="validation batches per evaluation")
    p.add_argument("--data", default=None, metavar="FILE",
                   help="train on this text file instead of Python's standard-library source")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--compare", choices=["adamw", "full-state"], default=None,
                   help="also train the same budget with another optimizer and overlay the curves: adamw "
                        "(torch.optim.AdamW, fp32 weights, computing as LAMB's run does: bf16 autocast for --precision "
                        "bf16, fp32 otherwise, at --compare-lr), or full-state (LAMB with fp32 moments and fp32 "
                        "masters at --lr: the lean run's reference)")
    p.add_argument("--compare-lr", type=float, default=3e-3, help="peak learning rate of --compare adamw")
    p.add_argument("--out", default="mplamb-report", help="report and checkpoint folder")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --out")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# what the report needs beyond torch: module -> what for
REPORT_PACKAGES = {"matplotlib": "the plots", "tqdm": "the progress bar"}


def missing_report_packages(progress: bool = True) -> List[str]:
    """The packages of ``REPORT_PACKAGES`` that do not import here (tqdm only with a progress bar)."""
    missing = []
    for name in REPORT_PACKAGES:
        if name == "tqdm" and not progress:
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def run_from_args(args: argparse.Namespace) -> int:
    """``python -m mplamb train``: checks the arguments and the packages the report needs before any
    training, trains LAMB (and ``--compare``'s optimizer), writes the report; the exit status."""
    from .demo import report

    def fail(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    for name in ("steps", "batch_size", "context", "layers", "dim", "heads", "eval_every", "eval_batches",
                 "ckpt_every"):
        if getattr(args, name) < 1:
            return fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.dim % args.heads:
        return fail(f"--dim ({args.dim}) must be a multiple of --heads ({args.heads})")
    if not args.lr > 0 or not args.compare_lr > 0:
        return fail("--lr and --compare-lr must be > 0")
    if args.warmup < 1:
        return fail(f"--warmup must be >= 1, got {args.warmup}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        return fail("--device cuda: no CUDA device is available here")
    missing = missing_report_packages(progress=not args.no_progress)
    if missing:
        what = ", ".join(f"{m} ({REPORT_PACKAGES[m]})" for m in missing)
        hint = " (or run with --no-progress)" if missing == ["tqdm"] else ""
        return fail(f"the report needs {what}, which this Python cannot import; install with: "
                    f"{sys.executable} -m pip install {' '.join(missing)}{hint}")
    try:
        corpus = load_corpus(args.data, context=args.context)
    except (OSError, ValueError, RuntimeError) as e:
        return fail(str(e))
    lean = (args.moments, args.master_weights) != ("fp32", "fp32")
    if args.compare == "full-state" and not lean:
        return fail("--compare full-state: the LAMB run already keeps full state; pick --moments or --master-weights")
    out = pathlib.Path(args.out)
    first = TrainConfig(moments=args.moments, master_weights=args.master_weights).name
    saved = checkpoint_precision(out / f"checkpoint-{first}.pt") if args.resume and args.precision == "auto" else None
    if saved is not None:
        precision, why = saved, "auto: the precision of the checkpoint being resumed"
    else:
        precision, why = precision_decision(args.precision, args.device)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                      weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed,
                      context=args.context, layers=args.layers, dim=args.dim, heads=args.heads, precision=precision,
                      eval_every=args.eval_every, eval_batches=args.eval_batches, data=args.data, device=args.device,
                      moments=args.moments, master_weights=args.master_weights)
    out.mkdir(parents=True, exist_ok=True)
    nparams = sum(p.numel() for p in TinyGPT(cfg.model_config()).parameters())
    print(f"data: {corpus.name} ({corpus.train.numel():,} train / {corpus.val.numel():,} validation bytes); "
          f"unigram baseline {corpus.unigram_loss:.3f} nats/byte")
    print(f"model: {nparams / 1e6:.2f}M params, {cfg.layers} layers x {cfg.dim} wide, context {cfg.context}; "
          f"precision {precision} ({why}); {cfg.steps} steps of {cfg.batch_size}x{cfg.context} bytes")
    runs: Dict[str, dict] = {}
    plan = [cfg]
    if args.compare == "adamw":
        plan.append(dataclasses.replace(cfg, optimizer="adamw", lr=args.compare_lr, moments="fp32",
                                        master_weights="fp32"))
    elif args.compare == "full-state":
        plan.append(dataclasses.replace(cfg, moments="fp32", master_weights="fp32"))
    try:
        for c in plan:
            runs[c.name] = train(c, corpus, out, resume=args.resume, ckpt_every=args.ckpt_every,
                                      progress=not args.no_progress)
    except CheckpointError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print(f"\ninterrupted: checkpoint saved in {out}; continue with the same arguments plus --resume",
              file=sys.stderr)
        return 130
    for r in runs.values():
        r.pop("final_state", None)
    report.write_metrics(out, runs)
    paths = [report.plot_losses(out, runs, corpus.unigram_loss)]
    tr = report.plot_trust_ratios(out, runs[cfg.name])
    if tr is not None:
        paths.append(tr)
    table = report.summary_table(runs, corpus.unigram_loss)
    (out / "summary.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nreport: {', '.join(str(p) for p in paths)}, {out / 'metrics.csv'}, {out / 'metrics.json'}")
    return 0
