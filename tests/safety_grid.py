"""The whole grid of ``test_adaptive.test_adaptive_step_never_blows_up`` (every option combination, 4 seeds):
the worst ratios of the full-data loss to its initial value, from which that test's bounds are derived.

    python tests/safety_grid.py    # about 2 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import itertools

from test_adaptive import SAFETY_GRID, _ill_conditioned_run, safety_options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    rows = []
    for point in itertools.product(range(4), *SAFETY_GRID):
        seed, kind, *rest = point
        losses = _ill_conditioned_run(seed, kind, safety_options(*rest))
        rows.append((max(losses) / losses[0], point))
    rows.sort(reverse=True)
    whole = [r for r in rows if r[1][-1] == 1.0 or r[1][2] == "fisher"]
    print("worst (quadratic model on the whole minibatch): %.3g× at %s" % whole[0])
    print("worst (GGN model from a quarter of it):          %.3g× at %s" % next(r for r in rows if r not in whole))
    for ratio, point in rows[:8]:
        print(f"{ratio:10.3g}×  {point}")


if __name__ == "__main__":
    main()
