"""Sweeps: N runs of one stage in one compiled program, each with its own logs and result.

A ``sweep:`` section names the stage it applies to and the axes::

    sweep:
      stage: ppo                                  # the stage run as a sweep (the others run once)
      seeds: [0, 1, 2, 3, 4]                      # run.seed of each run, crossed with the axes
      grid:                                       # key path -> values: every combination
        ppo.trainer.kl_coef: [0.05, 0.1]
      paired: {}                                  # key path -> values, taken together (same length)

``N = len(seeds) x prod(len(grid values)) x len(paired values)`` runs, seeds innermost. A key
whose value only enters the step as an array (:data:`VMAPPABLE`: the learning rate, and for PPO
beta, clip epsilon, value clip, gamma, lambda, temperature, c_vf; and the seed) varies *inside*
one program: the stage's ``prepare`` builds each run's state from its own config, the states are
stacked on a leading run axis, and ``jax.vmap`` of the stage's step over it runs all N runs in
one compiled call per step. Any other key (model size, epochs, preset, ...) changes the program:
the runs that share its value form one **program**, and the programs run one after another.

The skeleton is :func:`rlhf_jax.pipeline.run_stage`'s, on a stacked state: prepare -> write ->
place (each leaf's sharding with a leading ``None`` for the run axis) -> step ->
:func:`rlhf_jax.train.run_loop` with ``runs=N`` (per-run evaluation, early stopping as a mask,
checkpoints of the stacked state with the mask in their meta) -> each run's ``finish``. Layout::

    <run.dir>/<stage>/sweep.json               the runs: index, program, configuration, values
    <run.dir>/<stage>/runs/<k>/                run k: metrics.jsonl, samples.jsonl, tensorboard/,
                                                 final/ (a Hugging Face directory)
    <run.dir>/<stage>/programs/<g>/checkpoints the stacked state of program g (exact resume)

``rlhf-jax export RUN_DIR OUT --run K`` exports run K; ``rlhf-jax report <run.dir>/<stage>``
draws mean curves with 95% bands per configuration and compares configurations
(:mod:`rlhf_jax.report`).

Each run reads its own batches (the data order is a function of its seed), so the batch fed to
the program is the N runs' batches stacked ``[N, B, ...]``. ``sweep.shard_runs: data`` splits the
run axis over the mesh's ``data`` devices (8 runs on 8 devices; or runs x data with a mesh of
``data`` x ``fsdp``: the rows then split over ``fsdp``). Sweeps run on one process for now.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import config as config_lib
from rlhf_jax.train import stack_states

__all__ = [
    "RUNS_DIR",
    "SEED_KEY",
    "SWEEP_FILE",
    "VMAPPABLE",
    "Run",
    "SweepConfig",
    "expand",
    "load_sweep",
    "run_dir",
    "run_sweep",
    "stack",
    "vmap_step",
]

SWEEP_FILE = "sweep.json"  # in <stage dir>: the runs of the sweep
RUNS_DIR = "runs"  # <stage dir>/runs/<k>: run k
PROGRAMS_DIR = "programs"  # <stage dir>/programs/<g>/checkpoints: program g's stacked state
SEED_KEY = "run.seed"

# Keys (below the stage's section) whose values enter the compiled step as arrays in the state,
# so that runs differing only in them share one program.
VMAPPABLE: dict[str, tuple[str, ...]] = {
    "sft": ("trainer.optim.learning_rate",),
    "rm": ("trainer.optim.learning_rate",),
    "ppo": (
        "trainer.kl_coef",
        "trainer.optim.learning_rate",
        "trainer.clip_eps",
        "trainer.value_clip",
        "trainer.gamma",
        "trainer.lam",
        "trainer.temperature",
        "trainer.vf_coef",
    ),
    "cost": ("trainer.optim.learning_rate",),
    "dpo": (  # DPOHParams (rlhf_jax.algorithms.dpo)
        "trainer.beta",
        "trainer.optim.learning_rate",
        "trainer.label_smoothing",
        "trainer.simpo_gamma",
        "trainer.rpo_alpha",
        "trainer.temperature",
    ),
    "grpo": (  # GRPOHParams (rlhf_jax.algorithms.grpo)
        "trainer.kl_coef",
        "trainer.optim.learning_rate",
        "trainer.clip_eps",
        "trainer.clip_eps_high",
        "trainer.temperature",
    ),
}

VMAPPABLE["safe_ppo"] = (  # PPOHParams with PPO-Lagrangian's three
    *VMAPPABLE["ppo"],
    "trainer.safety.threshold",
    "trainer.safety.lambda_init",
    "trainer.safety.lambda_lr",
)

_Value = int | float | str | bool


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """N runs of one stage in one program (axes over the numbers a step takes as arrays)."""

    stage: str | None = None  # the stage run as a sweep, e.g. "ppo"; None = no sweep
    seeds: tuple[int, ...] = ()  # run.seed of each run, crossed with the axes; () = run.seed
    grid: dict[str, tuple[_Value, ...]] = dataclasses.field(default_factory=dict)  # every combo
    paired: dict[str, tuple[_Value, ...]] = dataclasses.field(default_factory=dict)  # zipped
    # split the run axis over this mesh axis ("data": e.g. 8 runs on 8 devices; the batch rows
    # then split over the other batch axis only); None = every device holds every run
    shard_runs: str | None = None

    def __post_init__(self):
        for name in ("grid", "paired"):
            for key, values in getattr(self, name).items():
                if not values:
                    raise ValueError(f"sweep.{name}[{key!r}] is empty: give at least one value")
                if key == SEED_KEY:
                    raise ValueError(f"sweep.{name}[{key!r}]: give the seeds as sweep.seeds")
        lengths = {len(v) for v in self.paired.values()}
        if len(lengths) > 1:
            raise ValueError(
                f"sweep.paired: the lists have different lengths {sorted(lengths)}; paired values "
                "are taken together, so give each key the same number (or use sweep.grid)"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"sweep.seeds={list(self.seeds)} repeats a seed")
        if self.shard_runs not in (None, "data", "fsdp"):
            raise ValueError(
                f"sweep.shard_runs={self.shard_runs!r}: choose a batch axis of the mesh, 'data' "
                "or 'fsdp' (or null)"
            )


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: its index, program, values (key path -> value) and full config."""

    index: int
    program: int
    values: dict[str, Any]
    cfg: Any  # the run's ExperimentConfig
    label: str  # its configuration without the seed, e.g. "trainer.kl_coef=0.05" ("base": none)

    @property
    def seed(self) -> int:
        return int(self.cfg.run.seed)


def _short(key: str, stage: str) -> str:
    return key.removeprefix(f"{stage}.")


def _set(data: dict, key: str, value: Any, where: str) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "none (a value)"
            raise config_lib.ConfigError(
                f"{where}: {key!r} is not a config key ({'.'.join(parts[: i + 1])!r} does not "
                f"exist; the keys there are: {known}): name a key of the stage's section, e.g. "
                "ppo.trainer.kl_coef"
            )
        if i == len(parts) - 1:
            node[part] = value
        node = node[part]


def expand(cfg: Any, stage: str) -> list[Run]:
    """The runs of ``cfg.sweep`` for ``stage``, each with its validated config; grouped into
    programs by their values of the keys outside :data:`VMAPPABLE`. Raises ConfigError (one line)
    for a key that is not in the config or not under the stage's section."""
    from rlhf_jax.pipeline import STAGES

    sw: SweepConfig = cfg.sweep
    if sw.stage is not None and sw.stage not in STAGES:
        raise config_lib.ConfigError(
            f"sweep.stage={sw.stage!r} is not a stage; the stages are: {', '.join(STAGES)}"
        )
    if sw.stage != stage:
        return []
    keys = list(sw.grid) + list(sw.paired)
    for key in keys:
        if not key.startswith(f"{stage}."):
            raise config_lib.ConfigError(
                f"sweep key {key!r} is not in the {stage} section: a sweep of stage {stage!r} "
                f"varies {stage}.* keys (and the seeds, sweep.seeds)"
            )
    combos = list(itertools.product(*(sw.grid[k] for k in sw.grid))) or [()]
    pairs = list(zip(*(sw.paired[k] for k in sw.paired), strict=True)) or [()]
    seeds = list(sw.seeds) or [cfg.run.seed]
    vmappable = {f"{stage}.{k}" for k in VMAPPABLE.get(stage, ())}
    base = config_lib.to_dict(cfg)
    runs: list[Run] = []
    programs: dict[tuple, int] = {}
    for combo, pair, seed in itertools.product(combos, pairs, seeds):
        values = dict(zip(list(sw.grid) + list(sw.paired), combo + pair, strict=True))
        data = json.loads(json.dumps(base))
        where = f"sweep run {len(runs)}"
        for key, value in values.items():
            _set(data, key, value, where)
        _set(data, SEED_KEY, int(seed), where)
        try:
            run_cfg = config_lib.from_dict(type(cfg), data)
        except config_lib.ConfigError as err:
            raise config_lib.ConfigError(f"{where} ({values}): {err}") from None
        static = tuple((k, repr(v)) for k, v in values.items() if k not in vmappable)
        program = programs.setdefault(static, len(programs))
        label = ", ".join(f"{_short(k, stage)}={v}" for k, v in values.items()) or "base"
        runs.append(Run(len(runs), program, {**values, SEED_KEY: int(seed)}, run_cfg, label))
    return runs


def run_dir(stage_dir: str, k: int) -> str:
    """The directory of run ``k`` of a sweep of the stage at ``stage_dir``."""
    return os.path.join(stage_dir, RUNS_DIR, str(k))


def load_sweep(stage_dir: str | os.PathLike) -> dict | None:
    """The ``sweep.json`` of a stage directory (None when the stage was not a sweep)."""
    path = os.path.join(os.fspath(stage_dir), SWEEP_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------
# The run axis: stacked states and batches, the vmapped step
# ------------------------------------------------------------------------------------------


def stack(trees: Sequence[Any]) -> Any:
    """Stack pytrees of the same structure on a new leading (run) axis."""
    return stack_states(trees)


def _uses(spec: Any, axis: str) -> bool:
    return any(axis == a or (isinstance(a, tuple) and axis in a) for a in spec)


def stacked_shardings(shardings: Any, mesh: jax.sharding.Mesh, run_axis: str | None = None):
    """Each leaf's ``NamedSharding`` with a leading run axis, split over ``run_axis`` (a mesh
    axis no parameter uses) or unsharded (None)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    def one(s):
        if run_axis is not None and _uses(s.spec, run_axis):
            raise config_lib.ConfigError(
                f"sweep.shard_runs={run_axis!r}: the parallel preset already splits parameters "
                f"over {run_axis!r} ({s.spec}): split the runs over another axis or use preset dp"
            )
        return NamedSharding(mesh, P(run_axis, *s.spec))

    return jax.tree.map(one, shardings)


def stacked_batches(
    sources: Sequence[Callable[[int], Any]], mesh: jax.sharding.Mesh, run_axis: str | None = None
):
    """``batches(s)``: the N runs' batches ``s`` stacked ``[N, B, ...]``: the run axis over
    ``run_axis`` (or unsharded), the rows over the mesh's other batch axes."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from rlhf_jax import parallel

    rows = tuple(a for a in parallel.BATCH_AXES if a != run_axis)

    def place(x):
        x = np.asarray(x)
        spec = P(run_axis, rows, *([None] * (x.ndim - 2)))
        return jax.device_put(x, NamedSharding(mesh, spec))

    def batches(s: int):
        return jax.tree.map(lambda *xs: place(np.stack(xs)), *[src(s) for src in sources])

    return batches


def vmap_step(step: Callable) -> Callable:
    """``step(state, batch, key)`` over a leading run axis of ``state`` and ``batch`` (the key is
    shared: the steps draw their randomness from the state's seed). ``step`` is the stage's
    compiled step; ``jax.vmap`` of it is one compiled program for all runs (its state donated)."""
    return jax.vmap(step, in_axes=(0, 0, None))


# ------------------------------------------------------------------------------------------
# The sweep through the stage skeleton
# ------------------------------------------------------------------------------------------


def _shared_context_class():
    from rlhf_jax.pipeline import Context

    @dataclasses.dataclass
    class SharedInputs(Context):
        """A Context whose model, tokenizer and dataset loads are shared by a sweep's runs (the
        N ``prepare`` calls read each input once)."""

        cache: dict = dataclasses.field(default_factory=dict)

        def _memo(self, key, make):
            if key not in self.cache:
                self.cache[key] = make()
            return self.cache[key]

        def load_model(self, path, **heads):
            key = ("model", path, tuple(sorted((k, _fingerprint(v)) for k, v in heads.items())))
            return self._memo(key, lambda: Context.load_model(self, path, **heads))

        def load_tokenizer(self, path, model=None):
            return self._memo(("tok", path), lambda: Context.load_tokenizer(self, path, model))

        def dataset(self, path, key, tokenizer, data, model=None):
            memo = ("data", path, key, id(tokenizer), repr(data), id(model))
            return self._memo(
                memo, lambda: Context.dataset(self, path, key, tokenizer, data, model)
            )

    return SharedInputs


def _fingerprint(v: Any) -> Any:
    if isinstance(v, jax.Array | np.ndarray):
        return np.asarray(jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key)
                          else v).tobytes()  # fmt: skip
    return repr(v)


def _write_sweep_file(stage_dir: str, stage: str, runs: Sequence[Run], sw: SweepConfig) -> None:
    os.makedirs(stage_dir, exist_ok=True)
    record = {
        "stage": stage,
        "axes": {"seeds": list(sw.seeds), "grid": sw.grid, "paired": sw.paired},
        "runs": [
            {
                "run": r.index,
                "program": r.program,
                "config": r.label,
                "seed": r.seed,
                "values": r.values,
                "dir": os.path.join(RUNS_DIR, str(r.index)),
            }
            for r in runs
        ],
    }
    path = os.path.join(stage_dir, SWEEP_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(config_lib.to_dict(record), f, indent=2)
    os.replace(path + ".tmp", path)


def _prepare_program(ctx: Any, runs: Sequence[Run], prepare: Callable, cache: dict):
    """Each run's Context and Plan (inputs shared), validated before anything is written."""
    shared = _shared_context_class()
    contexts = [
        shared(cfg=r.cfg, stage=ctx.stage, mesh=ctx.mesh, say=ctx.say, cache=cache) for r in runs
    ]
    plans = [prepare(c) for c in contexts]
    if plans[0].loop is None:
        raise config_lib.ConfigError(
            f"sweep.stage={ctx.stage!r} is a data stage (no training loop): sweep a training "
            "stage (sft, rm, ppo, ...)"
        )
    return contexts, plans


def run_sweep(ctx: Any, prepare: Callable, runs: Sequence[Run]) -> Any:
    """Run a sweep's programs through the stage skeleton; returns a StageResult whose ``runs``
    holds each run's LoopResult (in run order). Called by :func:`rlhf_jax.pipeline.run_stage`."""
    from rlhf_jax import parallel, pipeline
    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.logging import RunLogger
    from rlhf_jax.train import LoopResult, run_loop, run_slice

    cfg, name, mesh = ctx.cfg, ctx.stage, ctx.mesh
    if jax.process_count() > 1:
        raise config_lib.ConfigError(
            "sweeps run on one process for now: run the sweep on one host (or one program per "
            "host with its own sweep.seeds)"
        )
    cache: dict = {}
    groups = [[r for r in runs if r.program == g] for g in range(1 + max(r.program for r in runs))]
    first = _prepare_program(ctx, groups[0], prepare, cache)
    # ---- everything above validated and loaded; from here on the run directory is written ----
    pipeline.write_config(cfg)
    _write_sweep_file(ctx.dir, name, runs, cfg.sweep)
    results: dict[int, LoopResult] = {}
    last = None
    for g, group in enumerate(groups):
        contexts, plans = first if g == 0 else _prepare_program(ctx, group, prepare, cache)
        first = None
        n = len(group)
        ctx.say(f"[{name}] program {g}: runs {[r.index for r in group]} ({n} in one step)")
        shardings = parallel.state_shardings(plans[0].state, mesh, cfg.parallel.preset)
        run_axis = cfg.sweep.shard_runs
        if run_axis is not None and n % mesh.shape[run_axis]:
            raise config_lib.ConfigError(
                f"sweep.shard_runs={run_axis!r}: program {g} has {n} runs, which do not split "
                f"over the {mesh.shape[run_axis]} devices of mesh axis {run_axis!r}: change the "
                "number of runs or parallel.mesh"
            )
        placed = stacked_shardings(shardings, mesh, run_axis)
        state = jax.device_put(stack([p.state for p in plans]), placed)
        for p in plans:
            p.state = None  # the stacked copy is the state now
        # The stage's step, compiled without a mesh and vmapped over the run axis: XLA places its
        # work by the stacked state's and batches' shardings. (A step compiled for the mesh enters
        # jax.set_mesh, which cannot be traced under vmap.)
        mesh_of = [c.mesh for c in contexts]
        contexts[0].mesh = None
        try:
            step = vmap_step(plans[0].make_step(None))
        finally:
            contexts[0].mesh = mesh_of[0]
        batches = stacked_batches([p.batches for p in plans], mesh, run_axis)
        prog_dir = os.path.join(ctx.dir, PROGRAMS_DIR, str(g))
        ckpt = Checkpointer(
            os.path.join(prog_dir, "checkpoints"),
            save_every=plans[0].save_every,
            keep=cfg.run.keep_checkpoints,
        )
        latest = ckpt.latest_step()
        if latest is not None and not plans[0].loop.resume:
            ckpt.close()
            raise config_lib.ConfigError(
                f"{prog_dir} holds checkpoints up to step {latest} but "
                f"{name}.trainer.loop.resume is false: choose a new run.dir, delete that "
                "directory, or resume"
            )
        loggers = []
        try:
            for j, (r, c) in enumerate(zip(group, contexts, strict=True)):
                c.logger = RunLogger(
                    run_dir(ctx.dir, r.index),
                    tensorboard=cfg.run.tensorboard,
                    wandb_project=cfg.run.wandb_project,
                    progress_total=plans[0].loop.max_steps,
                    progress=cfg.run.progress and j == 0,
                    resume_step=latest or 0,
                    wandb_run_name=f"{os.path.basename(os.path.normpath(cfg.run.dir))}-{name}-"
                    f"{r.index}",
                    config={**config_lib.to_dict(r.cfg), "sweep_run": r.index},
                )
                loggers.append(c.logger)
            result = run_loop(
                step,
                state,
                batches,
                loop=plans[0].loop,
                key=plans[0].key,
                eval_fn=[p.eval_fn for p in plans],
                logger=loggers,
                checkpointer=ckpt,
                meta={"stage": name, "program": g},
                runs=n,
            )
        finally:
            for lg in loggers:
                lg.close()
            ckpt.close()
        last = result
        if result.stop_reason == "preempted":
            ctx.say(
                f"[{name}] preempted at step {result.step} (program {g}): checkpoint saved; run "
                "the same command again to resume"
            )
            return pipeline.StageResult(name, ctx.dir, None, result, None, runs=None)
        for j, (r, p, rr) in enumerate(zip(group, plans, result.runs, strict=True)):
            one = LoopResult(
                state=run_slice(result.state, j),
                step=rr.step,
                stop_reason=rr.stop_reason,
                history=rr.history,
                evals=rr.evals,
                timings=result.timings,
                first_step_s=result.first_step_s,
                skipped=rr.skipped,
                start_step=result.start_step,
            )
            outputs = p.finish(one.state, one)
            if outputs.tokenizer is None:
                outputs.tokenizer = p.tokenizer
            meta = {
                "stage": name,
                "sweep_run": r.index,
                "values": r.values,
                "step": rr.step,
                "stop_reason": rr.stop_reason,
                "info": outputs.info,
            }
            pipeline.save_final(run_dir(ctx.dir, r.index), outputs, meta)
            results[r.index] = one
        ctx.say(f"[{name}] program {g}: {n} runs done; results in {ctx.dir}/{RUNS_DIR}/<k>/final")
    return pipeline.StageResult(
        name, ctx.dir, None, last, None, runs=[results[r.index] for r in runs]
    )


def summary(results: Sequence[Any], runs: Sequence[Run], metric: str) -> Mapping[str, Any]:
    """``{configuration: [last value of eval metric per run]}`` from a sweep's LoopResults."""
    out: dict[str, list[float]] = {}
    for r, res in zip(runs, results, strict=True):
        values = [e[metric] for e in res.evals if metric in e]
        if values:
            out.setdefault(r.label, []).append(values[-1])
    return out
