"""The README's Python examples run as written, in order, each seeing what the earlier ones defined, in a
fresh interpreter as a user runs them (and isolated from the state other tests leave in torch.compile)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
# the examples' torch.compile runs with the aot_eager backend: the same graphs, no C++ build (minutes)
PRELUDE = "import functools, torch\ntorch.compile = functools.partial(torch.compile, backend='aot_eager')\n"


def test_readme_examples_run_in_order(tmp_path):
    assert len(BLOCKS) >= 4
    script = tmp_path / "readme_examples.py"
    script.write_text(PRELUDE + "\n".join(f"# README python block {i}\n{b}" for i, b in enumerate(BLOCKS)))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
