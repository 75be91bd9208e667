import os

import torch
from hypothesis import HealthCheck, settings

# Small and fast by default (deadline off: the first call of a torch.func transform is slow).
# KFAC_TEST_SCALE=10 multiplies every example count for a longer local search (see oracles.budget).
settings.register_profile(
    "kfac",
    max_examples=10 * int(os.environ.get("KFAC_TEST_SCALE", "1")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("kfac")

# Tiny tensors: one intra-op thread is far faster than several (no OpenMP hand-offs), above all on a
# busy 2-core machine.
torch.set_num_threads(1)
