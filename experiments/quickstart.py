"""Run the embedded default task end to end: SFT -> reward model -> PPO, then a report.

    python experiments/quickstart.py                      # seed 0, into runs/quickstart/
    python experiments/quickstart.py --seed 1 --run-dir runs/quickstart-1
    python experiments/quickstart.py --help               # every knob of QuickstartConfig

Intentionally kept short: the pipeline is :func:`rlhf_jax.quickstart.run` (also ``rlhf-jax
quickstart``); its report lands in ``<run-dir>/report.md``, ``report.json`` and ``ppo_curves.png``.
"""

import tyro

from rlhf_jax.quickstart import QuickstartConfig, run

if __name__ == "__main__":
    run(tyro.cli(QuickstartConfig, description=__doc__.splitlines()[0]))
