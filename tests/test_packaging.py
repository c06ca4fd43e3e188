"""What ``pip install mplamb`` delivers: the wheel and sdist build, and the wheel alone, in a clean
virtual environment with the pinned CPU torch, gives the fused CPU backend (no fallback warning),
its type marker, the CLI, and a main job that writes its plots.

Slow (a fresh environment: about a minute, most of it pip and numba's first compilation), but
it is the only test that sees the package as a user installs it rather than this checkout.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # the project's pin: an unpinned torch would pull gigabytes of CUDA wheels

SMOKE = textwrap.dedent("""
    import importlib.resources, warnings
    warnings.simplefilter("error")  # a fallback onto a slow backend warns: make it fail here
    import torch, mplamb
    from mplamb.kernels import resolve_backend_name
    assert resolve_backend_name("auto", "cpu") == "fused_cpu", resolve_backend_name("auto", "cpu")
    assert importlib.resources.files("mplamb").joinpath("py.typed").is_file()
    m = torch.nn.Linear(8, 4).to(torch.bfloat16)
    opt = mplamb.Lamb(m.parameters(), lr=1e-2)
    m(torch.randn(2, 8, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    print("version", mplamb.__version__)
""")


def run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_wheel_in_a_clean_environment(tmp_path):
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), str(ROOT)])
    wheels, sdists = list(dist.glob("mplamb-*.whl")), list(dist.glob("mplamb-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1
    import mplamb

    assert f"mplamb-{mplamb.__version__}-" in wheels[0].name  # the version is defined once
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", TORCH, str(wheels[0])], env=env)
    assert "version " + mplamb.__version__ in run([py, "-c", SMOKE], env=env, cwd=tmp_path)
    assert "train" in run([py, "-m", "mplamb", "--help"], env=env, cwd=tmp_path)
    report = tmp_path / "report"
    run([py, "-m", "mplamb", "train", "--steps", "4", "--eval-every", "2", "--eval-batches", "1", "--no-progress",
         "--out", str(report)], env=env, cwd=tmp_path)
    assert (report / "loss.png").is_file() and (report / "metrics.json").is_file()
