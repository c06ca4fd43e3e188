"""The main job (python -m mplamb train) and the bench command, on tiny configurations."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
import torch

import mplamb
from mplamb import cli
from mplamb.bench.isolated import mxnet_python, own_process_peer_available
from mplamb.demo import report
from mplamb.demo.data import load_corpus
import mplamb.train as train_module
from mplamb.train import CheckpointError, TrainConfig, precision_decision, train

TINY = dict(steps=8, batch_size=4, context=16, layers=1, dim=16, heads=2, warmup=2, eval_every=4, eval_batches=2,
            lr=0.05)
TINY_ARGS = ["--steps", "8", "--batch-size", "4", "--context", "16", "--layers", "1", "--dim", "16", "--heads", "2",
             "--warmup", "2", "--eval-every", "4", "--eval-batches", "2", "--no-progress"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> pathlib.Path:
    import inspect

    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(inspect.getsource(torch.optim.Optimizer) * 2)
    return path


@pytest.fixture(scope="module")
def corpus(text_file):
    return load_corpus(str(text_file), context=16)


def test_training_reduces_loss(corpus):
    cfg = TrainConfig(**{**TINY, "steps": 40, "eval_every": 40, "batch_size": 16, "context": 16})
    h = train(cfg, corpus, progress=False)
    assert h["val_loss"][-1] < h["val_loss"][0] - 0.5
    assert len(h["trust_ratio"]) == 40 and len(h["trust_ratio"][0]) == len(h["param_names"])


@pytest.mark.parametrize("precision", ["bf16-weights", "bf16"])
@pytest.mark.parametrize("optimizer", ["lamb", "adamw"])
def test_resume_equals_uninterrupted_bitwise(tmp_path, corpus, optimizer, precision):
    cfg = TrainConfig(**TINY, optimizer=optimizer, precision=precision)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = train(cfg, corpus, tmp_path / "a", progress=False)
    train(cfg, corpus, tmp_path / "b", progress=False, stop_after=3, ckpt_every=100)
    resumed = train(cfg, corpus, tmp_path / "b", progress=False, resume=True)
    for name, p in full["final_state"].items():
        assert torch.equal(p, resumed["final_state"][name]), name
    assert full["train_loss"] == resumed["train_loss"] and full["val_loss"] == resumed["val_loss"]


def test_bad_checkpoints_are_clear_errors(tmp_path, corpus):
    cfg = TrainConfig(**TINY)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(cfg, corpus, tmp_path, progress=False, resume=True)
    (tmp_path / "checkpoint-lamb.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        train(cfg, corpus, tmp_path, progress=False, resume=True)
    torch.save({"hello": 1}, tmp_path / "checkpoint-lamb.pt")
    with pytest.raises(CheckpointError, match="not an mplamb training checkpoint"):
        train(cfg, corpus, tmp_path, progress=False, resume=True)
    train(cfg, corpus, tmp_path, progress=False, stop_after=2)
    other = TrainConfig(**{**TINY, "lr": 0.01})
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.05, now 0.01"):
        train(other, corpus, tmp_path, progress=False, resume=True)


def test_cli_writes_the_report(tmp_path, text_file, capsys):
    out = tmp_path / "report"
    rc = cli.main(["train", *TINY_ARGS, "--data", str(text_file), "--out", str(out), "--compare", "adamw",
                   "--precision", "bf16-weights"])
    assert rc == 0
    for name in ("loss.png", "trust_ratio.png", "metrics.csv", "metrics.json", "summary.md",
                 "checkpoint-lamb.pt", "checkpoint-adamw.pt"):
        assert (out / name).is_file(), name
    for png in ("loss.png", "trust_ratio.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("optimizer,step") and len(rows) == 1 + 2 * 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"lamb", "adamw"}
    assert metrics["adamw"]["precision"] == {"policy": "bf16-weights", "compute": "fp32", "weights": "fp32",
                                             "masters": None, "moments": "fp32"}
    assert metrics["adamw"]["compute_dtype"] == metrics["lamb"]["compute_dtype"] == "fp32"
    text = capsys.readouterr().out
    assert "| lamb | bf16-weights (fp32 compute; bf16 weights, fp32 masters; fp32 moments) |" in text
    assert "| adamw | bf16-weights (fp32 compute; fp32 weights; fp32 moments) |" in text and "unigram baseline" in text
    assert "| tokens/s | warm-up s |" in text and "| tokens/s | warm-up s |" in (out / "summary.md").read_text()


LEAN_ARGS = [a if a != "16" else "64" for a in TINY_ARGS]  # dim 64: matrices of 4096+ elements get 8-bit codes


def test_cli_lean_state_against_full_state(tmp_path, text_file, capsys):
    out = tmp_path / "lean"
    rc = cli.main(["train", *LEAN_ARGS, "--data", str(text_file), "--out", str(out), "--precision", "bf16-weights",
                   "--moments", "8bit", "--master-weights", "kahan", "--compare", "full-state"])
    assert rc == 0
    assert (out / "checkpoint-lamb-8bit-kahan.pt").is_file() and (out / "checkpoint-lamb.pt").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    lean, full = metrics["lamb-8bit-kahan"], metrics["lamb"]
    assert full["memory"]["state_bytes_per_param"] == 12.0
    assert lean["memory"]["state_bytes_per_param"] < 6.0  # small tensors (biases, norms) keep fp32 moments
    assert lean["precision"]["moments"] == "8bit" and lean["precision"]["masters"] == "Kahan-compensated"
    if pathlib.Path("/proc/self/clear_refs").exists():  # peak = training state + the steps' measured transient
        for run in (lean, full):
            assert run["memory"]["peak_bytes"] >= run["memory"]["training_state_bytes"]
    text = capsys.readouterr().out
    assert "Kahan-compensated bf16 weights; 8bit moments" in text and "lamb-8bit-kahan minus lamb" in text
    assert "| peak MB |" in text
    rc = cli.main(["train", *LEAN_ARGS, "--data", str(text_file), "--out", str(tmp_path / "x"), "--compare",
                   "full-state"])
    assert rc == 2 and "already keeps full state" in capsys.readouterr().err


@pytest.mark.skipif(not pathlib.Path("/proc/self/clear_refs").exists(), reason="resident peaks need Linux's /proc")
def test_peak_memory_sees_a_transient_allocation_and_forgets_it_on_start():
    from mplamb._memory import PeakMemory
    tracker = PeakMemory().start()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, written, then freed
    del x
    assert tracker.extra_bytes() >= 60 * 2**20
    tracker.start()
    assert tracker.extra_bytes() < 60 * 2**20


def test_lean_resume_equals_uninterrupted_bitwise(tmp_path, corpus):
    cfg = TrainConfig(**{**TINY, "dim": 64}, precision="bf16-weights", moments="8bit", master_weights="kahan")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full = train(cfg, corpus, tmp_path / "a", progress=False)
    train(cfg, corpus, tmp_path / "b", progress=False, stop_after=3, ckpt_every=100)
    resumed = train(cfg, corpus, tmp_path / "b", progress=False, resume=True)
    assert full["train_loss"] == resumed["train_loss"] and full["val_loss"] == resumed["val_loss"]
    for name, value in full["final_state"].items():
        assert torch.equal(value, resumed["final_state"][name]), name
    other = dataclasses.replace(cfg, moments="4bit")
    with pytest.raises(CheckpointError, match="no checkpoint to resume at .*checkpoint-lamb-4bit-kahan.pt"):
        train(other, corpus, tmp_path / "b", progress=False, resume=True)


@pytest.mark.parametrize("precision,compute", [("bf16", "bf16"), ("bf16-weights", "fp32"), ("fp32", "fp32")])
def test_compared_optimizers_compute_in_the_same_precision(corpus, precision, compute):
    """AdamW keeps fp32 weights but computes as LAMB's run does (bf16 autocast for bf16): like with like."""
    runs = {opt: train(TrainConfig(**{**TINY, "steps": 2}, optimizer=opt, precision=precision), corpus,
                       progress=False) for opt in ("lamb", "adamw")}
    for opt, h in runs.items():
        assert h["compute_dtype"] == compute, opt  # the logits' dtype, seen in the forward pass
        assert h["precision"]["policy"] == precision
        assert h["precision"]["compute"] == ("bf16 autocast" if precision == "bf16" else "fp32")
    assert runs["adamw"]["precision"]["weights"] == "fp32" and runs["adamw"]["precision"]["masters"] is None
    lamb_weights = "fp32" if precision == "fp32" else "bf16"
    assert runs["lamb"]["precision"]["weights"] == lamb_weights
    assert runs["lamb"]["precision"]["masters"] == (None if precision == "fp32" else "fp32")


def test_auto_precision_is_decided_from_the_cpu_flags_not_timings(monkeypatch):
    flags = "fpu sse2 avx2 avx512f avx512bw"
    assert precision_decision("auto", "cpu", flags + " amx_bf16 amx_tile")[0] == "bf16"
    assert precision_decision("auto", "cpu", flags + " avx512_bf16")[0] == "bf16-weights"
    assert precision_decision("auto", "cpu", flags)[0] == "bf16-weights"
    assert precision_decision("auto", "cpu", "")[0] == "bf16-weights"
    for asked in ("bf16", "bf16-weights", "fp32"):
        assert precision_decision(asked, "cpu", flags) == (asked, "as asked")
    assert "amx_bf16" in precision_decision("auto", "cpu", flags + " amx_bf16")[1]
    assert isinstance(train_module.cpu_flags(), str)  # this machine's flags; "" where there is no /proc/cpuinfo
    monkeypatch.setattr(train_module, "cpu_flags", lambda: "avx2 amx_bf16")
    assert train_module.resolve_precision("auto", "cpu") == "bf16"  # the default flags are cpu_flags()
    assert not hasattr(train_module, "bf16_is_fast")  # no timing probe left to disagree with itself


def test_resume_takes_the_checkpoints_precision(tmp_path, text_file, monkeypatch, capsys):
    """--precision auto on --resume: the checkpoint's precision, whatever the machine would pick now."""
    base = ["train", *TINY_ARGS, "--data", str(text_file), "--out", str(tmp_path)]
    monkeypatch.setattr(train_module, "cpu_flags", lambda: "avx2 amx_bf16")
    assert cli.main(base) == 0
    assert "precision bf16 (auto: the CPU has amx_bf16" in capsys.readouterr().out
    assert torch.load(tmp_path / "checkpoint-lamb.pt", weights_only=True)["config"]["precision"] == "bf16"
    monkeypatch.setattr(train_module, "cpu_flags", lambda: "avx2")  # now auto alone would say bf16-weights
    assert cli.main([*base, "--resume"]) == 0
    captured = capsys.readouterr()
    assert "precision bf16 (auto: the precision of the checkpoint being resumed)" in captured.out
    assert "another configuration" not in captured.err
    assert cli.main([*base, "--resume", "--precision", "fp32"]) == 2  # an explicit other precision still differs
    assert "precision: checkpoint 'bf16', now 'fp32'" in capsys.readouterr().err


def test_throughput_excludes_warm_up(corpus, monkeypatch):
    """Compiling the kernels ahead of training and the first step are warm-up, reported apart; tokens/s
    counts only the steps after them."""
    import time

    calls = []
    monkeypatch.setattr(train_module._Run, "uses_fused_cpu", lambda self: True)
    monkeypatch.setattr(train_module._Run, "warm_up", lambda self: (calls.append(self.step), time.sleep(0.5)))
    cfg = TrainConfig(**TINY)
    h = train(cfg, corpus, progress=False, log=lambda msg: None)
    assert calls == [0]  # before the first step
    assert h["warmup_s"] >= 0.5 and h["timed_steps"] == cfg.steps - 1
    assert h["timed_s"] + h["warmup_s"] <= h["wall_s"]
    assert h["tokens_per_s"] == pytest.approx(h["timed_steps"] * cfg.batch_size * cfg.context / h["timed_s"])
    table = report.summary_table({"lamb": h}, 3.0)
    assert f"| {h['tokens_per_s']:.0f} | {h['warmup_s']:.1f} |" in table
    one = train(TrainConfig(**{**TINY, "steps": 1}), corpus, progress=False, log=lambda msg: None)
    assert one["timed_steps"] == 0 and one["tokens_per_s"] is None
    assert "| n/a |" in report.summary_table({"lamb": one}, 3.0)


def test_warm_up_covers_every_bias_case_of_the_run(corpus, monkeypatch):
    """Step 1, and from t = 356 (beta1 = 0.9) the mean's bias divisor is exactly 1: another loop to compile."""
    fused_cpu = pytest.importorskip("mplamb.kernels.fused_cpu")
    seen = []
    monkeypatch.setattr(fused_cpu, "warm_up", lambda dtypes, steps: seen.append((dtypes, steps)))
    for steps, precision in [(400, "bf16"), (20000, "fp32"), (1, "bf16-weights")]:
        train_module._Run(TrainConfig(**{**TINY, "steps": steps}, precision=precision), corpus).warm_up()
    assert seen == [((torch.bfloat16,), (1, 400)), ((torch.float32,), (1, 1000, 20000)), ((torch.bfloat16,), (1,))]


@pytest.mark.parametrize("missing,fragment", [("matplotlib", "matplotlib (the plots)"),
                                              ("tqdm", "tqdm (the progress bar)")])
def test_cli_missing_report_packages_fail_before_training(tmp_path, text_file, monkeypatch, capsys, missing,
                                                          fragment):
    """A package the report needs that does not import: a one-line error with the pip command, before any
    training (not an ImportError at the end of the run)."""
    import sys

    trained = []
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    monkeypatch.setattr(train_module, "train", lambda *a, **kw: trained.append(a))
    argv = ["train", *[a for a in TINY_ARGS if a != "--no-progress"], "--data", str(text_file),
            "--out", str(tmp_path / "report")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err and f"-m pip install {missing}" in err
    assert trained == [] and not (tmp_path / "report").exists()


def test_tqdm_is_not_needed_without_a_progress_bar(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert train_module.missing_report_packages(progress=False) == []
    assert train_module.missing_report_packages(progress=True) == ["tqdm"]


@pytest.mark.parametrize("args,fragment", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--dim", "10", "--heads", "3"], "multiple of --heads"),
    (["--lr", "-1"], "--lr and --compare-lr must be > 0"),
    (["--data", "/nonexistent/file.txt"], "no such file"),
    (["--device", "cuda"], "no CUDA device") if not torch.cuda.is_available() else (["--steps", "0"], "--steps"),
])
def test_cli_bad_arguments(tmp_path, args, fragment, capsys):
    rc = cli.main(["train", "--out", str(tmp_path), "--no-progress", *args])
    assert rc == 2
    assert fragment in capsys.readouterr().err


def test_cli_resume_with_other_arguments_is_a_clear_error(tmp_path, text_file, capsys):
    base = ["train", *TINY_ARGS, "--data", str(text_file), "--out", str(tmp_path), "--precision", "fp32"]
    assert cli.main(base) == 0
    capsys.readouterr()
    assert cli.main([*base, "--resume", "--lr", "0.5"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_help_texts(capsys):
    for sub in ("train", "bench"):
        with pytest.raises(SystemExit) as e:
            cli.main([sub, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert "--out" in text
    with pytest.raises(SystemExit):
        cli.main([])


def test_bench_runs_on_a_tiny_workload(tmp_path, monkeypatch, capsys):
    from mplamb import bench

    monkeypatch.setitem(bench.WORKLOADS, "tiny", lambda: [(64, 3), (5,), (1000,)])
    result = bench.run(["tiny"], ["fp32", "bf16", "fp16"], repeats=2, roof_elements=100_000)
    names = {r["name"] for r in result["rows"]}
    assert "mplamb Lamb [reference]" in names and "torch AdamW (fused)" in names
    assert {r["param_dtype"] for r in result["rows"] if r["setup"] == "fp16" and r["name"].startswith("mplamb")} \
        == {"float16"}
    assert all(len(r["times"]) == 2 and r["median_s"] > 0 for r in result["rows"])
    assert "fraction of in-place roof" in bench.table(result)
    result["notes"].append("tiny: a peer timed out")
    assert "Note: tiny: a peer timed out." in bench.table(result)
    bench.chart(result, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["bench", "--workloads", "nope"]) == 2
    assert "unknown workload" in capsys.readouterr().err
    assert cli.main(["bench", "--setups", "fp8"]) == 2
    assert "unknown setup 'fp8' (choose from fp32, bf16, fp16)" in capsys.readouterr().err
    assert cli.main(["bench", "--lean", "8bit-fp16"]) == 2
    assert "expected <fp32|bf16|8bit|4bit>-<fp32|kahan|none>" in capsys.readouterr().err


def test_bench_lean_rows_and_their_bytes(monkeypatch):
    from mplamb import bench
    from mplamb.bench.runner import lean_bytes

    monkeypatch.setitem(bench.WORKLOADS, "tiny", lambda: [(64, 80), (7,)])
    result = bench.run(["tiny"], ["fp32", "bf16"], repeats=1, roof_elements=100_000, with_peers=False,
                       backends=["reference"], lean=["8bit-kahan"])
    lean = [r for r in result["rows"] if "8bit moments, kahan weights" in r["name"]]
    assert [r["setup"] for r in lean] == ["bf16"]  # lean rows on the half-weight setups only
    # bf16 weight 2 B, codes 1 B: grad 2 + codes 4x1 + (p, c) 4 | codes 2x1 + (p, c) 4 + (p, c) written 4
    assert lean[0]["bytes_per_param"] == lean_bytes(torch.bfloat16, "8bit", "kahan") == 20.0
    assert lean_bytes(torch.float32, "fp32", "fp32") == 40.0  # fp32 weights and moments: the full-state LAMB_BYTES


def test_bench_ratios_are_paired_by_round():
    """The machine's speed drifts between rounds; the per-round ratio cancels it.  Rows timed in a
    process of their own are not paired: their ratio is that of the medians."""
    import statistics

    from mplamb.bench.report import ratio

    def row(times, **kw):
        return dict(times=times, median_s=statistics.median(times), **kw)

    drift = [1.0, 3.0, 1.1, 2.9, 2.8]
    assert ratio(row([0.5 * d for d in drift]), row([0.2 * d for d in drift])) == pytest.approx(2.5)
    ours, peer = row([1.0, 2.0, 3.0]), row([3.0, 2.0, 9.0])  # per round 3, 1, 3; medians 2 and 3
    assert ratio(peer, ours) == pytest.approx(3.0)
    assert ratio(dict(peer, interleaved=False), ours) == pytest.approx(1.5)
    assert ratio(row([3.0, 9.0]), ours) == pytest.approx(3.0)  # not the same rounds: medians (6 / 2)


def test_bench_late_step_rows_start_at_that_step(monkeypatch, capsys):
    from mplamb import bench

    monkeypatch.setitem(bench.WORKLOADS, "tiny", lambda: [(64, 3), (5,)])
    seen = []
    real_step = mplamb.Lamb.step

    def spy(self, *a, **kw):
        seen.append((id(self), int(min(st["step"] for st in self.state.values())) if self.state else 0))
        return real_step(self, *a, **kw)

    monkeypatch.setattr(mplamb.Lamb, "step", spy)
    result = bench.run(["tiny"], ["fp32"], repeats=2, with_peers=False, backends=["fused_cpu"],
                       roof_elements=10_000, late_step=400)
    names = [r["name"] for r in result["rows"]]
    assert "mplamb Lamb [fused_cpu]" in names and "mplamb Lamb [fused_cpu] from t=400" in names
    by_opt = {}
    for opt, step in seen:
        by_opt.setdefault(opt, []).append(step)
    starts = sorted(steps[1] for steps in by_opt.values())  # the step count before the first timed step
    assert starts == [1, 399]
    text = bench.table(result)
    assert "| [fused_cpu] is faster by | [fused_cpu] from t=400 is faster by |" in text
    assert cli.main(["bench", "--late-step", "1"]) == 2
    assert "--late-step" in capsys.readouterr().err


def test_ctrl_c_saves_a_checkpoint_and_exits_130(tmp_path, text_file, capsys):
    """SIGINT during training: the current step finishes, a checkpoint is saved, exit code 130."""
    import os
    import signal
    import threading

    args = ["train", *TINY_ARGS, "--data", str(text_file), "--out", str(tmp_path), "--precision", "fp32"]
    args[args.index("--steps") + 1] = "100000"
    timer = threading.Timer(3.0, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    try:
        rc = cli.main(args)
    finally:
        timer.cancel()
    assert rc == 130
    assert "checkpoint saved" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "checkpoint-lamb.pt", weights_only=True)
    assert 0 < ckpt["step"] < 100000


def test_own_process_peer_reports_failures_and_timeouts_as_notes(monkeypatch):
    import subprocess

    from mplamb.bench import isolated

    def failing(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, stdout="", stderr="Traceback ...\nImportError: no jaxlib")

    notes = []
    monkeypatch.setattr(isolated.subprocess, "run", failing)
    monkeypatch.setattr(isolated, "memory_cap", lambda: 2**33)
    assert isolated.run_optax([(3,)], 2, notes, "tiny") is None
    assert notes == [f"tiny: {isolated.OPTAX} failed (exit 1: ImportError: no jaxlib; memory cap 8.0 GiB)"]

    def slow(*args, **kwargs):
        raise subprocess.TimeoutExpired(args, kwargs["timeout"])

    monkeypatch.setattr(isolated.subprocess, "run", slow)
    assert isolated.run_optax([(3,)], 2, notes, "tiny") is None
    assert "ran past" in notes[-1]


@pytest.mark.skipif(not own_process_peer_available(), reason="optax and jax not installed")
def test_own_process_peer_over_its_memory_cap_fails_alone(monkeypatch):
    """A child that needs more memory than its cap fails with a note; it cannot take the machine's."""
    from mplamb.bench import isolated

    monkeypatch.setattr(isolated, "memory_cap", lambda: 2**28)
    notes = []
    assert isolated.run_optax([(64, 3)], 2, notes, "tiny") is None
    assert len(notes) == 1 and "failed" in notes[0] and "memory cap 0.2 GiB" in notes[0]


@pytest.mark.skipif(not own_process_peer_available(), reason="optax and jax not installed")
def test_own_process_optax_peer_times_real_steps():
    from mplamb.bench import isolated

    notes = []
    out = isolated.run_optax([(64, 3), (5,), (0,)], 3, notes, "tiny")
    assert notes == [] and len(out["times"]) == 3 and all(t > 0 for t in out["times"]) and "optax" in out["versions"]


def test_mxnet_interpreter_is_found_explicitly_by_environment_or_beside_the_checkout(tmp_path, monkeypatch):
    from mplamb.bench import isolated

    fake = tmp_path / "python"
    fake.write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MPLAMB_MXNET_PYTHON", raising=False)
    assert isolated.mxnet_python() is None
    assert isolated.mxnet_python(str(fake)) == str(fake)
    assert isolated.mxnet_python(str(tmp_path / "missing")) is None
    monkeypatch.setenv("MPLAMB_MXNET_PYTHON", str(fake))
    assert isolated.mxnet_python() == str(fake)
    monkeypatch.delenv("MPLAMB_MXNET_PYTHON")
    (tmp_path / ".venv-mxnet" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-mxnet" / "bin" / "python").write_text("")
    assert isolated.mxnet_python() == str(pathlib.Path(".venv-mxnet") / "bin" / "python")


@pytest.mark.skipif(mxnet_python() is None,
                    reason="no interpreter with MXNet (scripts/setup_mxnet.sh)")
@pytest.mark.parametrize("mp", [False, True])
def test_own_process_mxnet_peer_times_real_steps(mp):
    from mplamb.bench import isolated

    notes = []
    out = isolated.run_mxnet(isolated.mxnet_python(), [(64, 3), (5,), (1000,)], 2, mp, notes, "tiny")
    assert notes == [] and len(out["times"]) == 2 and out["versions"]["mxnet"].startswith("1.9")


def test_bench_rejects_a_missing_gpu_or_mxnet_interpreter_clearly(capsys, tmp_path):
    assert cli.main(["bench", "--mxnet-python", str(tmp_path / "nope")]) == 2
    assert "--mxnet-python" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli.main(["bench", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
