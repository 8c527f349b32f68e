"""Curves and a summary table from one or more run directories (``rlhf-jax report``).

Reads each run's ``metrics.jsonl`` (see :mod:`rlhf_jax.logging`), draws one panel per quantity an
RLHF run is judged by — proxy reward, gold score (where the task knows one, as the embedded toy
task does), KL to the reference, entropy, response length, value loss, clip fraction, and the loss
and accuracy of SFT and reward-model runs — with every run overlaid in each panel, saves a PNG
(matplotlib's Agg backend: no display needed) and returns a plain-text summary table.

Metric names are matched by pattern (``PANELS``), so ``reward``, ``ppo/score`` and
``objective/scores`` all land in the reward panel; ``metrics=[...]`` picks the keys explicitly.

A **sweep** (a stage directory with ``sweep.json``, :mod:`rlhf_jax.sweep`) is reported by
configuration: each configuration's mean curve over its seeds with a 95% Student-t band, a table
of final values (mean ± CI half-width), and Welch comparisons of configurations as sentences with
the difference, its CI, the p-value and whether it is significant (:func:`sweep_report`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

from rlhf_jax.logging import read_metrics

__all__ = [
    "PANELS",
    "compare_configs",
    "final_table",
    "find_sweep",
    "load_runs",
    "load_sweep_runs",
    "match_panels",
    "mean_curves",
    "plot_runs",
    "plot_sweep",
    "report",
    "seed_summary",
    "summary_table",
    "sweep_report",
]

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
    compare: Sequence[str] | None = None,
    metric: str | None = None,
) -> tuple[str, str]:
    """Plot and summarise runs; returns ``(png path, summary table)``.

    ``out`` defaults to ``RUN_DIR/report.png`` for one run, ``report.png`` in the working
    directory for several. One directory holding a sweep (a stage directory with ``sweep.json``,
    or a run directory with one such stage) is reported by :func:`sweep_report` (``compare``,
    ``metric`` are its).
    """
    swept = find_sweep(run_dirs[0]) if len(run_dirs) == 1 else None
    if swept is not None:
        return sweep_report(swept, out, metrics=metrics, compare=compare, metric=metric)
    if compare or metric:
        raise ValueError(
            "report: --compare and --metric apply to a sweep (a stage with sweep.json)"
        )
    runs = load_runs(run_dirs)
    if out is None:
        out = os.path.join(run_dirs[0], "report.png") if len(run_dirs) == 1 else "report.png"
    plot_runs(runs, out, metrics=metrics, smooth=smooth)
    return os.fspath(out), summary_table(runs)


# ------------------------------------------------------------------------------------------
# Sweeps: mean curves with confidence bands, a final-value table, Welch comparisons
# ------------------------------------------------------------------------------------------

# The metric a sweep's comparison is about when none is named: the first one a run logged.
HEADLINE = ("eval/win_rate", "eval/gold", "eval/reward", "eval/accuracy", "eval/loss", "score/mean")


def find_sweep(path: str | os.PathLike) -> str | None:
    """The stage directory of a sweep at ``path`` (itself, or the one stage of a run directory
    that holds a ``sweep.json``), else None."""
    from rlhf_jax.sweep import SWEEP_FILE

    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, SWEEP_FILE)):
        return path
    if not os.path.isdir(path):
        return None
    found = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, SWEEP_FILE)))
    return os.path.join(path, found[-1]) if found else None


def load_sweep_runs(stage_dir: str | os.PathLike) -> tuple[dict, dict[str, list[list[dict]]]]:
    """``(sweep record, {configuration: [records of each of its runs]})`` of a sweep's stage
    directory (runs without metrics yet are left out)."""
    from rlhf_jax.sweep import load_sweep

    sweep = load_sweep(stage_dir)
    if sweep is None:
        raise FileNotFoundError(f"report: {stage_dir} holds no sweep.json (is it a sweep?)")
    groups: dict[str, list[list[dict]]] = {}
    for run in sweep["runs"]:
        d = os.path.join(os.fspath(stage_dir), run["dir"])
        if os.path.isfile(os.path.join(d, "metrics.jsonl")):
            groups.setdefault(run["config"], []).append(read_metrics(d))
    if not groups:
        raise ValueError(f"report: the runs of the sweep in {stage_dir} logged no metrics yet")
    return sweep, groups


def _final(records: list[dict], key: str) -> float | None:
    _, ys = _series(records, key)
    return ys[-1] if ys else None


def sweep_metrics(groups: dict[str, list[list[dict]]]) -> list[str]:
    """The keys a sweep report shows: the headline ones logged, then each panel's first key."""
    keys: list[str] = []
    for runs in groups.values():
        for records in runs:
            keys += [k for k in _keys(records) if k not in keys and "reference/" not in k]
    shown = [k for k in HEADLINE if k in keys]
    for ks in match_panels(keys).values():
        evals = [k for k in ks if k.startswith("eval/")]
        for k in evals[:1] + ks[:1]:
            if k not in shown:
                shown.append(k)
    return shown[:9]


def mean_curves(
    runs: list[list[dict]], key: str, level: float = 0.95
) -> tuple[list[float], list[Any]]:
    """``(steps, [Estimate per step])`` of ``key`` over a configuration's runs: at each step
    the runs that logged it (a run stopped early drops out of the later steps)."""
    from rlhf_jax.stats import mean_ci

    by_step: dict[float, list[float]] = {}
    for records in runs:
        for x, y in zip(*_series(records, key), strict=True):
            by_step.setdefault(x, []).append(y)
    steps = sorted(by_step)
    return steps, [mean_ci(by_step[s], level) for s in steps]


def plot_sweep(groups, out_path, metrics: Sequence[str]) -> None:
    """One panel per metric: each configuration's mean curve with its 95% band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.4 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, metrics, strict=False):
        for i, (name, runs) in enumerate(groups.items()):
            steps, est = mean_curves(runs, key)
            if not steps:
                continue
            color = f"C{i % 10}"
            ax.plot(steps, [e.mean for e in est], color=color, lw=1.4,
                    label=f"{name} (n={len(runs)})")  # fmt: skip
            ax.fill_between(
                steps, [e.low for e in est], [e.high for e in est], color=color, alpha=0.2, lw=0
            )
        ax.set_title(f"{key} (mean, 95% CI)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    fig.tight_layout()
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def final_table(groups: dict[str, list[list[dict]]], metrics: Sequence[str]) -> str:
    """Mean ± 95% CI half-width of each run's last value, per configuration and metric."""
    from rlhf_jax.stats import mean_ci

    header = ["configuration", "runs", *metrics]
    rows = [header]
    for name, runs in groups.items():
        row = [name, str(len(runs))]
        for key in metrics:
            values = [v for v in (_final(r, key) for r in runs) if v is not None]
            if values:
                est = mean_ci(values)
                row.append(f"{est.mean:.4g} ± {est.half_width:.2g}")
            else:
                row.append("-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare_configs(
    groups: dict[str, list[list[dict]]], a: str, b: str, metric: str, level: float = 0.95
) -> str:
    """Welch's comparison of configurations ``a`` and ``b`` on the last value of ``metric`` of
    each of their runs, as one sentence (:meth:`rlhf_jax.stats.Comparison.sentence`)."""
    from rlhf_jax.stats import welch

    names = list(groups)
    for name in (a, b):
        if name not in groups:
            raise KeyError(
                f"report: no configuration {name!r} in the sweep; its configurations are: "
                f"{'; '.join(names)} (or give their indices 0..{len(names) - 1})"
            )
    va = [v for v in (_final(r, metric) for r in groups[a]) if v is not None]
    vb = [v for v in (_final(r, metric) for r in groups[b]) if v is not None]
    if len(va) < 2 or len(vb) < 2:
        return (
            f"{metric}: cannot compare {a!r} ({len(va)} runs) and {b!r} ({len(vb)} runs): "
            "a comparison needs at least 2 seeds per configuration (sweep.seeds)"
        )
    return welch(va, vb, level).sentence(metric, a, b)


def sweep_report(
    stage_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    metrics: Sequence[str] | None = None,
    compare: Sequence[str] | None = None,
    metric: str | None = None,
) -> tuple[str, str]:
    """Report a sweep: mean curves with 95% bands per configuration (PNG), the table of final
    values (mean ± CI over seeds) and Welch comparisons; returns ``(png path, text)``.

    ``compare``: two configurations (labels or indices in the table) to compare; default each
    configuration against the first. ``metric``: the compared metric (default the first of
    :data:`HEADLINE` the runs logged).
    """
    _, groups = load_sweep_runs(stage_dir)
    shown = list(metrics) if metrics else sweep_metrics(groups)
    if not shown:
        raise ValueError(f"report: the runs of the sweep in {stage_dir} logged no metrics yet")
    out = os.path.join(stage_dir, "sweep_report.png") if out is None else out
    plot_sweep(groups, out, shown)
    names = list(groups)
    target = metric or shown[0]
    if compare:
        if len(compare) != 2:
            raise ValueError(f"report: --compare takes two configurations, got {list(compare)}")
        pick = [names[int(c)] if str(c).isdigit() and int(c) < len(names) else c for c in compare]
        pairs = [(pick[0], pick[1])]
    else:
        pairs = [(name, names[0]) for name in names[1:]]
    lines = [
        f"sweep {os.fspath(stage_dir)}: {sum(len(r) for r in groups.values())} runs, "
        f"{len(groups)} configurations; final values, mean ± 95% CI half-width over seeds",
        "",
        final_table(groups, shown),
    ]
    if pairs:
        lines += ["", *(compare_configs(groups, a, b, target) for a, b in pairs)]
    return os.fspath(out), "\n".join(lines)


def seed_summary(runs: Sequence[Any], keys: Sequence[str], level: float = 0.95) -> dict[str, Any]:
    """``{key: Estimate}``: the mean and t interval over runs (seeds) of each run's last
    evaluation of ``key`` (``LoopResult.evals``, e.g. a sweep's ``StageResult.runs``); keys no
    run evaluated are left out. For headline figures such as "gold win rate 0.93 ± 0.02"."""
    from rlhf_jax.stats import mean_ci

    out = {}
    for key in keys:
        values = [r.evals[-1][key] for r in runs if r.evals and key in r.evals[-1]]
        if values:
            out[key] = mean_ci(values, level)
    return out
