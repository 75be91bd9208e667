#!/usr/bin/env bash
# The optional environment of benchmarks/bench_kfac_jax.py: kfac-jax 0.0.8 on jax/jaxlib 0.9.1 (the last jax its
# graph matcher works with), CPU only, in .venv-kfac-jax at the repository root (git-ignored). torch is not
# installed there and the project's own environment is not touched.
#
#     benchmarks/setup_kfac_jax.sh            # then: .venv-kfac-jax/bin/python benchmarks/bench_kfac_jax.py
#
# The direct requirements are pinned below; the rest are pinned to the versions this was checked with
# (kfac-jax needs distrax, whose tfp-nightly import needs the others).
# PYTHON picks the interpreter (>= 3.11, for distrax 0.1.9).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv-kfac-jax"
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet \
    jax==0.9.1 jaxlib==0.9.1 kfac-jax==0.0.8 optax==0.2.8 dm-haiku==0.0.17 \
    distrax==0.1.9 tfp-nightly==0.26.0.dev20261027 chex==0.1.92 dm-tree==0.1.10 numpy==2.4.6 \
    absl-py==2.5.1 immutabledict==4.3.1 jmp==0.0.4 ml_dtypes==0.6.0 opt_einsum==3.4.0 scipy==1.17.1
"$venv/bin/python" - <<'PY'
import jax, kfac_jax, haiku, optax
print(f"jax {jax.__version__} ({jax.default_backend()}), kfac-jax {kfac_jax.__version__}, "
      f"dm-haiku {haiku.__version__}, optax {optax.__version__}")
PY
