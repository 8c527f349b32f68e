"""Curves and a summary table from one or more run directories (``rlhf-jax report``).

Reads each run's ``metrics.jsonl`` (see :mod:`rlhf_jax.logging`), draws one panel per quantity an
RLHF run is judged by — proxy reward, gold score (where the task knows one, as the embedded toy
task does), KL to the reference, entropy, response length, value loss, clip fraction, and the loss
and accuracy of SFT and reward-model runs — with every run overlaid in each panel, saves a PNG
(matplotlib's Agg backend: no display needed) and returns a plain-text summary table.

Metric names are matched by pattern (``PANELS``), so ``reward``, ``ppo/score`` and
``objective/scores`` all land in the reward panel; ``metrics=[...]`` picks the keys explicitly.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

from rlhf_jax.logging import read_metrics

__all__ = ["PANELS", "load_runs", "match_panels", "plot_runs", "summary_table", "report"]

# (panel title, regular expression on the metric key, case-insensitive). A key goes to the first
# panel that matches; time/* keys never do.
PANELS: tuple[tuple[str, str], ...] = (
    ("gold score", r"gold"),
    ("reward", r"(^|/)(proxy_)?(rewards?|scores?)(_mean|/mean)?$|(^|/)(mean_)?(reward|score)s?$"),
    ("KL to reference", r"(^|/)(mean_|ref_)?kl(_mean|_div|/mean|/response|/token)?$"),
    ("KL coefficient", r"kl_(coef|coeff|beta)|(^|/)beta$"),
    ("entropy", r"entropy"),
    ("response length", r"(resp|response|gen|sample)[a-z_/]*len|(^|/)length$"),
    ("value loss", r"(value|vf|critic)[a-z_/]*loss"),
    ("clip fraction", r"clip[a-z_/]*frac"),
    ("policy loss", r"(policy|pg|actor)[a-z_/]*loss"),
    ("loss", r"(^|/)(train_|eval_)?loss$"),
    ("accuracy", r"acc(uracy)?$"),
)


def load_runs(run_dirs: Sequence[str | os.PathLike]) -> dict[str, list[dict[str, Any]]]:
    """``{run name: records}`` for each run directory (the name is the directory's name,
    made unique by its parent when two runs share one)."""
    if not run_dirs:
        raise ValueError("report: give at least one run directory")
    names: dict[str, list[dict[str, Any]]] = {}
    for d in run_dirs:
        d = os.path.normpath(os.fspath(d))
        if not os.path.isdir(d):
            raise FileNotFoundError(f"report: {d} is not a directory (give a run directory)")
        name = os.path.basename(d) or d
        if name in ("sft", "rm", "ppo"):  # a stage directory: name it by its run
            name = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(d))), name)
        if name in names:
            name = os.path.join(os.path.basename(os.path.dirname(d)), name)
        if name in names:
            name = d
        names[name] = read_metrics(d)
    return names


def _keys(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for r in records:
        for k in r:
            if k not in ("step", "wall_time") and not k.startswith("time/"):
                seen.setdefault(k, None)
    return list(seen)


def match_panels(keys: Sequence[str]) -> dict[str, list[str]]:
    """Group metric keys into the panels of ``PANELS`` (panels with no key are left out)."""
    out: dict[str, list[str]] = {}
    for key in keys:
        for title, pattern in PANELS:
            if re.search(pattern, key, flags=re.IGNORECASE):
                out.setdefault(title, []).append(key)
                break
    # Within a panel, training metrics first, then evaluations (eval/...): the table shows the
    # first key of each panel.
    return {
        title: sorted(out[title], key=lambda k: k.startswith("eval/"))
        for title, _ in PANELS
        if title in out
    }


def _series(records, key):
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def _ema(ys: list[float], alpha: float) -> list[float]:
    if alpha <= 0 or not ys:
        return ys
    out, acc = [], ys[0]
    for y in ys:
        acc = alpha * acc + (1 - alpha) * y
        out.append(acc)
    return out


def plot_runs(
    runs: dict[str, list[dict[str, Any]]],
    out_path: str | os.PathLike,
    *,
    metrics: Sequence[str] | None = None,
    smooth: float = 0.0,
) -> dict[str, list[str]]:
    """Draw the panels for ``runs`` into a PNG at ``out_path``; returns ``{panel: keys}`` drawn.

    ``metrics`` overrides the pattern matching with explicit keys (one panel each); ``smooth`` in
    [0, 1) is an exponential-moving-average weight applied to every curve (0 = raw).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not 0.0 <= smooth < 1.0:
        raise ValueError(f"report: smooth={smooth} must be in [0, 1)")
    all_keys: list[str] = []
    for records in runs.values():
        all_keys += [k for k in _keys(records) if k not in all_keys]
    if metrics:
        missing = [m for m in metrics if m not in all_keys]
        if missing:
            raise KeyError(
                f"report: no run logged {missing}; the metrics logged are: {', '.join(all_keys)}"
            )
        panels = {m: [m] for m in metrics}
    else:
        panels = match_panels(all_keys) or {k: [k] for k in all_keys[:12]}
    if not panels:
        raise ValueError(f"report: the runs {list(runs)} logged no metrics yet")
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.4 * nrows), squeeze=False)
    styles = ["-", "--", ":", "-."]
    for ax, (title, keys) in zip(axes.flat, panels.items(), strict=False):
        for i, (name, records) in enumerate(runs.items()):
            color = f"C{i % 10}"
            for j, key in enumerate(keys):
                xs, ys = _series(records, key)
                if not xs:
                    continue
                label = name if len(keys) == 1 else f"{name}: {key}"
                ax.plot(xs, _ema(ys, smooth), styles[j % 4], color=color, label=label, lw=1.4)
        ax.set_title(title if len(keys) > 1 or title == keys[0] else f"{title} ({keys[0]})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(runs) > 1 or len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return panels


def summary_table(runs: dict[str, list[dict[str, Any]]]) -> str:
    """A plain-text table: one row per run; steps, and the last value of each panel's first key."""
    all_keys: list[str] = []
    for records in runs.values():
        all_keys += [k for k in _keys(records) if k not in all_keys]
    panels = match_panels(all_keys) or {k: [k] for k in all_keys[:8]}
    columns = [keys[0] for keys in panels.values()]
    header = ["run", "steps", *columns]
    rows = [header]
    for name, records in runs.items():
        row = [name, str(records[-1]["step"]) if records else "0"]
        for key in columns:
            _, ys = _series(records, key)
            row.append(f"{ys[-1]:.4g}" if ys else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(
    run_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike | None = None,
    *,
    metrics: Sequence[str] | None = None,
    smooth: float = 0.0,
) -> tuple[str, str]:
    """Plot and summarise runs; returns ``(png path, summary table)``.

    ``out`` defaults to ``RUN_DIR/report.png`` for one run, ``report.png`` in the working
    directory for several.
    """
    runs = load_runs(run_dirs)
    if out is None:
        out = os.path.join(run_dirs[0], "report.png") if len(run_dirs) == 1 else "report.png"
    plot_runs(runs, out, metrics=metrics, smooth=smooth)
    return os.fspath(out), summary_table(runs)
