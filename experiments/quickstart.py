"""Run the embedded default task end to end: SFT -> label -> reward model -> PPO, then a report.

    python experiments/quickstart.py                         # seed 0, into runs/quickstart/
    python experiments/quickstart.py run.seed=1 run.dir=runs/quickstart-1
    python experiments/quickstart.py --help                  # every config key

Intentionally kept short: this is ``rlhf-jax quickstart`` (:func:`rlhf_jax.quickstart.run`, the
pipeline's stages on the toy task); the report lands in ``<run.dir>/report.md``, ``report.json``
and ``ppo_curves.png``.
"""

import sys

from rlhf_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["quickstart", *sys.argv[1:]]))
