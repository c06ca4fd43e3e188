"""The large-batch study (``python -m mplamb study``): plan, resume, best learning rates, verdicts, report.

One real ``--quick`` study end to end through the CLI; the bookkeeping is tested with a stand-in
for training that returns known losses.
"""
from __future__ import annotations

import json
import math

import pytest

from mplamb import cli, study
from mplamb.study import QUICK, StudyConfig


def fake_losses(table):
    """A stand-in for one training run: the loss ``table(optimizer, multiplier, lr, seed)``."""
    calls = []

    def train_one(cfg, run, corpus, precision):
        calls.append(study._key(run))
        batch = cfg.base_batch * run["multiplier"]
        return {**run, "batch": batch, "steps": max(1, cfg.budget // (batch * cfg.context)),
                "final_val_loss": table(run["optimizer"], run["multiplier"], run["lr"], run["seed"]),
                "final_train_loss": 0.0, "skipped_steps": 0, "wall_s": 0.0}
    return train_one, calls


def quadratic(opt, k, lr, seed):
    """Loss with a minimum at lr = centre * sqrt(k) (factor 1), LAMB better at large k, seed noise 0.01."""
    centre = dict(StudyConfig.base_lr)[opt] * math.sqrt(k)
    return 2.0 + (math.log(lr / centre)) ** 2 + (0.0 if opt == "adamw" else 0.1 - 0.05 * math.log2(k)) + 0.01 * seed


@pytest.fixture
def cfg():
    return StudyConfig(budget=4096, base_batch=2, multipliers=(1, 4, 16), lr_factors=(0.25, 0.5, 1.0, 2.0, 4.0),
                       seeds=3, layers=1, dim=16, heads=2, eval_batches=1)


def test_plan_best_lr_seeds_and_verdicts(cfg, tmp_path, monkeypatch):
    train_one, calls = fake_losses(quadratic)
    monkeypatch.setattr(study, "_train_one", train_one)
    summary = study.run_study(cfg, tmp_path, log=lambda m: None)
    assert len(calls) == 3 * 2 * 5 + 3 * 2 * 2  # the sweep, then two more seeds of each best lr
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == len(calls)
    for row in summary["rows"]:
        for opt in ("lamb", "adamw"):
            centre = dict(cfg.base_lr)[opt] * math.sqrt(row["multiplier"])
            assert row[opt]["lr"] == pytest.approx(centre, rel=1e-5)  # the sweep found the minimum
            assert len(row[opt]["losses"]) == 3 and row[opt]["std"] == pytest.approx(0.01)
    assert not any(r[o]["edge"] for r in summary["rows"] for o in ("lamb", "adamw"))
    verdicts = [r["verdict"] for r in summary["rows"]]
    assert verdicts == ["AdamW wins", "tie", "LAMB wins"]  # +0.1, 0.0, -0.1 against a spread of 0.01
    for name in ("study.md", "study.json", "study_loss.png", "study_sensitivity.png"):
        assert (tmp_path / name).is_file()
    assert "| 32 (16x) |" in (tmp_path / "study.md").read_text()


def test_resume_skips_finished_runs_and_survives_a_kill(cfg, tmp_path, monkeypatch):
    train_one, calls = fake_losses(quadratic)
    stop_after = 7

    def killed(*args):
        if len(calls) == stop_after:
            raise KeyboardInterrupt  # the study is killed during its eighth run
        return train_one(*args)

    monkeypatch.setattr(study, "_train_one", killed)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(cfg, tmp_path, log=lambda m: None)
    with (tmp_path / "runs.jsonl").open("a") as f:
        f.write('{"optimizer": "lamb", "multip')  # a half-written line from the kill
    monkeypatch.setattr(study, "_train_one", train_one)
    study.run_study(cfg, tmp_path, log=lambda m: None)
    assert len(calls) == len(set(calls)) == 3 * 2 * 5 + 3 * 2 * 2  # no run trained twice
    calls.clear()
    study.run_study(cfg, tmp_path, log=lambda m: None)
    assert calls == []  # everything finished: nothing re-run
    other = StudyConfig(**{**vars(cfg), "budget": 8192})
    study.run_study(other, tmp_path, log=lambda m: None)
    assert len(calls) == 3 * 2 * 5 + 3 * 2 * 2  # other settings: the old runs are not reused


def test_a_diverged_run_never_wins(cfg, tmp_path, monkeypatch):
    def table(opt, k, lr, seed):
        return float("nan") if lr == max(study._lr(cfg, opt, k, f) for f in cfg.lr_factors) else quadratic(
            opt, k, lr, seed)
    train_one, _ = fake_losses(table)
    monkeypatch.setattr(study, "_train_one", train_one)
    summary = study.run_study(cfg, tmp_path, log=lambda m: None)
    assert all(not math.isnan(r[o]["mean"]) for r in summary["rows"] for o in ("lamb", "adamw"))
    monotone, _ = fake_losses(lambda opt, k, lr, seed: 3.0 - lr + 0.01 * seed)  # best at the largest lr
    monkeypatch.setattr(study, "_train_one", monotone)
    summary = study.run_study(cfg, tmp_path / "edge", log=lambda m: None)
    assert all(r[o]["edge"] for r in summary["rows"] for o in ("lamb", "adamw"))
    assert "(grid edge)" in (tmp_path / "edge" / "study.md").read_text()


def test_quick_study_through_the_cli(tmp_path, capsys):
    out = tmp_path / "study"
    assert cli.main(["study", "--quick", "--no-progress", "--out", str(out)]) == 0
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    n_sweep = len(QUICK["multipliers"]) * 2 * len(QUICK["lr_factors"])
    assert len(runs) == n_sweep + len(QUICK["multipliers"]) * 2 * (QUICK["seeds"] - 1)
    assert all(math.isfinite(r["final_val_loss"]) for r in runs)
    assert "LAMB - AdamW" in capsys.readouterr().out
    assert (out / "study_loss.png").is_file() and (out / "study_sensitivity.png").is_file()
