"""The README's Python examples run as written, in order, each seeing what the earlier ones defined."""

from __future__ import annotations

import functools
import re
import sys
import types
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run_in_order(tmp_path, monkeypatch):
    assert len(BLOCKS) >= 4
    monkeypatch.chdir(tmp_path)
    # the examples' torch.compile runs with the aot_eager backend: the same graphs, no C++ build (minutes)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    module = types.ModuleType("__readme__")  # importable, as torch.compile wants of a function's module
    monkeypatch.setitem(sys.modules, "__readme__", module)
    namespace = module.__dict__
    for index, block in enumerate(BLOCKS):
        exec(compile(block, f"README.md[python block {index}]", "exec"), namespace)
