"""Packaging: one version number, and the dependencies ``import kfac_func`` needs to import quietly."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import kfac_func as kf

PYPROJECT = (Path(__file__).parents[1] / "pyproject.toml").read_text()


def test_version_has_one_source():
    """pyproject.toml takes the version from ``kfac_func.__version__``; the installed metadata agrees."""
    assert re.fullmatch(r"\d+\.\d+\.\d+(\.dev\d+|rc\d+)?", kf.__version__)
    assert 'dynamic = ["version"]' in PYPROJECT and 'version = { attr = "kfac_func.__version__" }' in PYPROJECT
    assert not re.search(r"^version\s*=", PYPROJECT.split("[tool.")[0], re.MULTILINE)
    assert importlib.metadata.version("kfac_func") == kf.__version__


def test_dependencies_cover_a_quiet_import():
    """numpy is declared (torch warns at import without it) and the import itself warns about nothing."""
    dependencies = re.search(r"^dependencies = \[(.*)\]$", PYPROJECT, re.MULTILINE).group(1)
    assert {re.split(r"[<>=]", d)[0] for d in re.findall(r'"([^"]+)"', dependencies)} == {"torch", "optree", "numpy"}
    subprocess.run([sys.executable, "-W", "error", "-c", "import kfac_func"], check=True)


def test_license_is_declared():
    """A license file ships and the metadata names it (BSD-3-Clause, as PyTorch)."""
    assert (Path(__file__).parents[1] / "LICENSE").read_text().startswith("BSD 3-Clause License")
    assert importlib.metadata.metadata("kfac_func")["License-Expression"] == "BSD-3-Clause"


def test_the_default_step_warns_about_nothing():
    """The default step's first forward-mode pass loads torch's jvp decompositions, which torch scripts with a
    deprecated API: none of that reaches the user's log (in a fresh interpreter, warnings as errors)."""
    script = (
        "import torch, torch.nn as nn, kfac_func as kf\n"
        "model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))\n"
        "kf.KFAC(model, loss='cross_entropy').step(torch.randn(8, 4), torch.randint(0, 3, (8,)))\n"
    )
    subprocess.run([sys.executable, "-W", "error", "-c", script], check=True)


def test_import_leaves_torchs_compiler_alone():
    """``import kfac_func`` does not import ``torch._dynamo`` (a second of import time): the functions that run
    outside torch.compile's graphs are wrapped when an optimizer is built."""
    script = ("import sys, kfac_func\n"
              "assert 'torch._dynamo' not in sys.modules, 'imported torch._dynamo'\n"
              "import torch\n"
              "kfac_func.kfac(torch.nn.Linear(2, 2), loss='mse')\n"
              "assert 'torch._dynamo' in sys.modules\n")
    subprocess.run([sys.executable, "-c", script], check=True)
