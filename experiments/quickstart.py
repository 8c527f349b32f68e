"""Run the embedded default task end to end: SFT -> label -> reward model -> PPO, then a report.

    python experiments/quickstart.py                         # PPO seeds 0-4, into runs/quickstart/
    python experiments/quickstart.py run.seed=1 run.dir=runs/quickstart-1
    python experiments/quickstart.py sweep.stage=null        # one PPO run (seed run.seed)
    python experiments/quickstart.py --help                  # every config key

SFT, label and the reward model run once; PPO runs five seeds in one compiled program (the
config's ``sweep:`` section), and the report gives each figure as the mean over the seeds with its
95% confidence interval.

Intentionally kept short: this is ``rlhf-jax quickstart`` (:func:`rlhf_jax.quickstart.run`, the
pipeline's stages on the toy task); the report lands in ``<run.dir>/report.md``, ``report.json``
and ``ppo_curves.png``, each seed's run in ``<run.dir>/ppo/runs/<k>/``.
"""

import sys

from rlhf_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["quickstart", *sys.argv[1:]]))
