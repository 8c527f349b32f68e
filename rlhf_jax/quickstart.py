"""The embedded default pipeline: SFT -> reward model -> PPO on the toy task, then a report.

This is what ``python experiments/quickstart.py`` and ``rlhf-jax quickstart`` run. Everything is
local and offline (:mod:`rlhf_jax.data.toy`): a micro-language, a word-level tokenizer saved in
Hugging Face format and loaded back through ``transformers.AutoTokenizer``, a programmatic gold
preference standing in for the human, and simulated labelers with Bradley-Terry noise.

Stages (each a library call, so a notebook can run them one at a time):

1. **SFT** (:mod:`rlhf_jax.algorithms.sft`): a tiny GPT-2-family LM, from scratch, learns the
   toy demonstrations (completion tokens only). It is the reference policy and the PPO start.
2. **Reward model** (:mod:`rlhf_jax.algorithms.reward_model`): the SFT trunk plus a scalar head,
   trained as InstructGPT's was: K samples of the SFT policy per prompt, ranked by the simulated
   labeler, all C(K, 2) pairs of a ranking in one batch element; accuracy on held-out rankings;
   then normalised so fresh SFT samples score mean 0, std 1 (lm-human-preferences).
3. **PPO** (:mod:`rlhf_jax.algorithms.ppo`): the policy maximises the reward model's score with a
   KL penalty to the SFT reference.
4. **Report**: on fixed evaluation prompts, the SFT and PPO policies' gold and reward-model scores,
   the gold win rate of PPO against SFT, the KL to the reference in nats per response, the share
   of well-formed responses, a few samples of each; a PNG of reward, gold score and KL over the PPO
   iterations; everything as JSON in the run directory (``report.json``).

The default configuration (:class:`QuickstartConfig`) is tuned to finish in a few minutes on two
CPU cores and to reach, for each seed, a gold win rate >= 80% against SFT, a KL <= 10 nats per
response and >= 95% well-formed responses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models, rollout
from rlhf_jax.algorithms import ppo as ppo_lib
from rlhf_jax.algorithms import reward_model as rm_lib
from rlhf_jax.algorithms import sft as sft_lib
from rlhf_jax.data import toy
from rlhf_jax.optim import OptimConfig
from rlhf_jax.parallel import MeshConfig, ParallelConfig, make_mesh, mesh_devices
from rlhf_jax.train import LoopConfig

__all__ = [
    "PolicyEval",
    "QuickstartConfig",
    "epoch_batches",
    "evaluate_policy",
    "format_report",
    "plot_ppo",
    "policy_config",
    "run",
]


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    """The default end-to-end run on the toy task: every knob of the pipeline in one place."""

    seed: int = 0  # run seed: data, initialisation, sampling and labels all derive from it
    run_dir: str = "runs/quickstart"  # where the tokenizer, report, plot and logs are written
    # -- the policy model (GPT-2 family, trained from scratch on the toy corpus) --
    arch: str = "gpt2"  # model family: "gpt2" | "llama"
    hidden_size: int = 64  # model width
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # attention heads (head_dim = hidden_size / num_heads)
    # -- SFT --
    sft_examples: int = 8192  # toy demonstrations in the SFT corpus
    sft: sft_lib.SFTConfig = sft_lib.SFTConfig(
        optim=OptimConfig(
            learning_rate=3e-3,
            schedule="cosine",
            warmup_steps=20,
            decay_steps=580,
            end_lr_ratio=0.1,
        ),
        loop=LoopConfig(max_steps=600, eval_every=200),
        batch_size=64,
    )  # SFT trainer (completion tokens only)
    # -- reward model --
    rm_groups: int = 3072  # labelled rankings (one prompt, rm_k SFT-policy samples each)
    rm_k: int = 4  # responses ranked per prompt (InstructGPT uses 4 to 9)
    rm_eval_groups: int = 256  # held-out rankings for the reported accuracy
    label_temperature: float = 0.3  # labeler noise: P(a > b) = sigmoid((gold_a - gold_b) / T)
    reward_model: rm_lib.RewardModelConfig = rm_lib.RewardModelConfig(
        loss="ranking",
        optim=OptimConfig(
            learning_rate=1e-3,
            schedule="cosine",
            warmup_steps=20,
            decay_steps=280,
            end_lr_ratio=0.1,
        ),
        loop=LoopConfig(max_steps=300, eval_every=100),
        batch_size=32,
    )  # reward-model trainer (K-wise ranking loss, normalised after training)
    # -- PPO --
    ppo_iterations: int = 60  # PPO iterations (rollout + learn); sets ppo.loop.max_steps
    ppo_prompts: int = 32  # prompts per iteration (each answered ppo.num_samples times)
    ppo: ppo_lib.PPOConfig = ppo_lib.PPOConfig(
        num_samples=4,
        num_epochs=4,
        num_minibatches=4,
        critic="separate",
        kl_coef=0.1,
        optim=OptimConfig(learning_rate=1e-4, eps=1e-5),
    )  # PPO; the pipeline sets its response length, stop tokens, temperature, seed, loop length
    ppo_eval_every: int = 10  # gold score of fresh samples every N iterations (for the plot)
    # -- evaluation --
    eval_samples_per_prompt: int = 4  # samples per evaluation prompt (every prompt of the world)
    temperature: float = 1.0  # sampling temperature of RM data, PPO rollouts and evaluation
    shown_samples: int = 8  # samples before/after printed in the report
    # -- placement (rlhf_jax.parallel; docs/scaling.md) --
    parallel: ParallelConfig = ParallelConfig(
        mesh=MeshConfig(data=1)
    )  # mesh, rules and step form of the SFT, RM and PPO trainers; default one device

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.rm_k < 2:
            raise ValueError(f"rm_k={self.rm_k}: a ranking needs at least 2 responses")
        if min(self.sft_examples, self.rm_groups, self.rm_eval_groups) < 1:
            raise ValueError("sft_examples, rm_groups and rm_eval_groups must be >= 1")
        if self.ppo_iterations < 1 or self.ppo_eval_every < 1:
            raise ValueError("ppo_iterations and ppo_eval_every must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0")


# ------------------------------------------------------------------------------------------
# Pieces
# ------------------------------------------------------------------------------------------


def policy_config(cfg: QuickstartConfig, tokenizer) -> models.ModelConfig:
    """The tiny LM's :class:`rlhf_jax.models.ModelConfig` for the toy vocabulary."""
    head_dim = cfg.hidden_size // cfg.num_heads
    return models.ModelConfig(
        arch=cfg.arch,
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_heads,
        head_dim=head_dim,
        intermediate_size=4 * cfg.hidden_size,
        max_position_embeddings=toy.PROMPT_LENGTH + toy.RESPONSE_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def epoch_batches(
    arrays: Mapping[str, np.ndarray], batch_size: int, seed: int
) -> Callable[[int], dict[str, np.ndarray]]:
    """``batches(s)``: step ``s``'s batch of a fresh permutation per epoch (a function of s only).

    Every batch is full (the tail of an epoch that does not fill one is dropped), so shapes are
    static and a resumed run sees the same batches.
    """
    n = len(next(iter(arrays.values())))
    per_epoch = n // batch_size
    if per_epoch < 1:
        raise ValueError(f"{n} examples do not fill one batch of {batch_size}")

    def batches(step: int) -> dict[str, np.ndarray]:
        epoch, pos = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        idx = order[pos * batch_size : (pos + 1) * batch_size]
        return {k: v[idx] for k, v in arrays.items()}

    return batches


def sft_arrays(tokenizer, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` toy demonstrations as prompt/completion arrays (the SFT corpus)."""
    records = toy.sft_records(n, seed)
    pt, pm = toy.encode_prompts(tokenizer, [r["prompt"] for r in records])
    ct, cm = toy.encode_responses(tokenizer, [r["completion"] for r in records])
    return {
        "prompt_tokens": pt,
        "prompt_mask": pm,
        "completion_tokens": ct,
        "completion_mask": cm,
    }


@dataclasses.dataclass
class PolicyEval:
    """A policy's samples on the evaluation prompts and their scores (numpy, one row a sample)."""

    prompts: list[str]
    responses: list[str]
    gold: np.ndarray  # [N] gold score (the simulated human)
    reward: np.ndarray  # [N] normalised reward-model score
    kl: np.ndarray  # [N] sum over response tokens of log pi - log pi_ref (k1), nats
    well_formed: np.ndarray  # [N] bool

    def summary(self) -> dict[str, float]:
        """Means over the samples: ``gold``, ``reward``, ``kl``, ``well_formed``, ``good``."""
        good = [toy.is_good(p, r) for p, r in zip(self.prompts, self.responses, strict=True)]
        return {
            "gold": float(self.gold.mean()),
            "reward": float(self.reward.mean()),
            "kl": float(self.kl.mean()),
            "well_formed": float(self.well_formed.mean()),
            "good": float(np.mean(good)),
        }

    def top(self, k: int) -> list[dict[str, Any]]:
        """The ``k`` most frequent responses: text, share of samples, well-formed, mean gold and
        reward (a policy that collapsed onto a few answers, or onto a hack, shows here)."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(self.responses):
            groups.setdefault(r, []).append(i)
        ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))[:k]
        return [
            {
                "response": r,
                "share": round(len(ix) / len(self.responses), 4),
                "well_formed": bool(self.well_formed[ix[0]]),
                "gold": round(float(self.gold[ix].mean()), 3),
                "reward": round(float(self.reward[ix].mean()), 3),
            }
            for r, ix in ranked
        ]

    def malformed(self, k: int) -> list[dict[str, Any]]:
        """Up to ``k`` malformed samples (prompt, response, gold, reward, kl)."""
        idx = np.flatnonzero(~self.well_formed)[:k]
        return [self._row(int(i)) for i in idx]

    def _row(self, i: int) -> dict[str, Any]:
        return {
            "prompt": self.prompts[i],
            "response": self.responses[i],
            "gold": round(float(self.gold[i]), 3),
            "reward": round(float(self.reward[i]), 3),
            "kl": round(float(self.kl[i]), 3),
        }

    def rows(self, k: int) -> list[dict[str, Any]]:
        """The first ``k`` samples as JSON-able rows (prompt, response, gold, reward, kl)."""
        return [self._row(i) for i in range(min(k, len(self.prompts)))]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _kl_and_reward(policy_gd, reference_gd, reward_gd, policy, reference, reward, tokens, mask):
    start = toy.PROMPT_LENGTH
    lp = models.token_logprobs(policy_gd, policy, tokens, mask, start=start)
    lr = models.token_logprobs(reference_gd, reference, tokens, mask, start=start)
    kl = jnp.sum((lp - lr) * mask[:, start:], axis=-1)
    return kl, models.scores(reward_gd, reward, tokens, mask)


def sample_responses(
    graphdef: Any,
    params: Any,
    tokenizer,
    prompts: Sequence[str],
    key: jax.Array,
    *,
    temperature: float = 1.0,
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """One sampled response per prompt: ``(tokens, mask)`` ``[N, P+R]`` int32 (prompt + response).

    Sampling runs in fixed chunks of ``chunk`` rows (the last one padded), so every call of the
    pipeline reuses one compiled sampler; row ``i`` draws from ``fold_in(key, i)`` whatever the
    chunking (:func:`rlhf_jax.rollout.sample` ``prompt_index``).
    """
    pt, pm = toy.encode_prompts(tokenizer, list(prompts))
    n = len(prompts)
    pad = -n % chunk
    pt = np.concatenate([pt, np.repeat(pt[:1], pad, 0)])
    pm = np.concatenate([pm, np.repeat(pm[:1], pad, 0)])
    outs = []
    for start in range(0, n + pad, chunk):
        sl = slice(start, start + chunk)
        out = rollout.sample(
            graphdef,
            params,
            jnp.asarray(pt[sl]),
            jnp.asarray(pm[sl]),
            key,
            max_new_tokens=toy.RESPONSE_LENGTH,
            sampling=rollout.SamplingConfig(temperature=temperature),
            stop_tokens=toy.stop_token_ids(tokenizer),
            prompt_index=jnp.arange(start, start + chunk, dtype=jnp.int32),
            pad_token_id=tokenizer.pad_token_id,
        )
        outs.append(jax.device_get((out.tokens, out.mask)))
    rt = np.concatenate([o[0] for o in outs])[:n].astype(np.int32)
    rm = np.concatenate([o[1] for o in outs])[:n].astype(np.int32)
    return np.concatenate([pt[:n], rt], 1), np.concatenate([pm[:n], rm], 1)


def evaluate_policy(
    policy: tuple[Any, Any],
    reference: Any,
    reward_model: Any,
    tokenizer,
    prompts: Sequence[str],
    key: jax.Array,
    *,
    temperature: float = 1.0,
    chunk: int = 256,
) -> PolicyEval:
    """Sample one response per prompt from the policy and score it every way the report needs.

    Args:
      policy: ``(graphdef, params)`` of the policy.
      reference: the reference (SFT) Model record; ``kl`` is the k1 estimate
        ``sum_t log pi(y_t) - log pi_ref(y_t)`` over the response tokens, whose mean over samples
        of ``pi`` estimates KL(pi || pi_ref) in nats per response.
      reward_model: the reward-model record (``reward`` is its normalised score).
      tokenizer: the toy tokenizer.
      prompts: the evaluation prompts (repeat a prompt for several samples).
      key: sampling key; sample ``i`` uses ``fold_in(key, i)``, so two policies sampled with one
        key share the noise.
      temperature: sampling temperature (1 = the policy's own distribution, where the KL holds).
      chunk: rows per compiled sampling/scoring call.
    """
    graphdef, params = policy
    tokens, mask = sample_responses(
        graphdef, params, tokenizer, prompts, key, temperature=temperature, chunk=chunk
    )
    p = toy.PROMPT_LENGTH
    responses = toy.decode_responses(tokenizer, tokens[:, p:], mask[:, p:])
    kl, reward = [], []
    n = len(prompts)
    pad = -n % chunk
    tk = np.concatenate([tokens, np.repeat(tokens[:1], pad, 0)])
    mk = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
    for start in range(0, n + pad, chunk):
        sl = slice(start, start + chunk)
        k, r = _kl_and_reward(
            graphdef,
            reference.graphdef,
            reward_model.graphdef,
            params,
            reference.params,
            reward_model.params,
            jnp.asarray(tk[sl]),
            jnp.asarray(mk[sl]),
        )
        kl.append(np.asarray(k))
        reward.append(np.asarray(r))
    return PolicyEval(
        prompts=list(prompts),
        responses=responses,
        gold=np.asarray(toy.gold_scores(list(prompts), responses), np.float64),
        reward=np.concatenate(reward)[:n].astype(np.float64),
        kl=np.concatenate(kl)[:n].astype(np.float64),
        well_formed=np.array([toy.is_well_formed(r) for r in responses]),
    )


def ranking_data(
    graphdef: Any,
    params: Any,
    tokenizer,
    n_groups: int,
    k: int,
    *,
    seed: int,
    label_temperature: float,
    sample_temperature: float = 1.0,
    chunk: int = 256,
) -> dict[str, np.ndarray]:
    """K-wise comparison data as InstructGPT collects it: K samples of the SFT policy per prompt,
    ranked by the simulated labeler (Plackett-Luce noise at ``label_temperature``).

    Returns :func:`rlhf_jax.data.toy.ranking_batch` arrays, ``response_tokens [n_groups, K, R]``
    ranked best to worst.
    """
    prompts = toy.sample_prompts(n_groups, seed=seed)
    flat = [p for p in prompts for _ in range(k)]
    tokens, mask = sample_responses(
        graphdef,
        params,
        tokenizer,
        flat,
        jax.random.PRNGKey(seed),
        temperature=sample_temperature,
        chunk=chunk,
    )
    p = toy.PROMPT_LENGTH
    responses = toy.decode_responses(tokenizer, tokens[:, p:], mask[:, p:])
    groups = [responses[i * k : (i + 1) * k] for i in range(n_groups)]
    records = toy.rank_responses(prompts, groups, temperature=label_temperature, seed=seed + 1)
    return _ranking_arrays(tokenizer, records, tokens[:, p:], mask[:, p:], responses, k)


def _ranking_arrays(tokenizer, records, tokens, mask, responses, k) -> dict[str, np.ndarray]:
    """Ranked records -> arrays, reusing the sampled token ids (re-encoding a malformed sample's
    text could differ from what the policy emitted, e.g. after the first stop token)."""
    n = len(records)
    pt, pm = toy.encode_prompts(tokenizer, [r["prompt"] for r in records])
    rt = np.zeros((n, k, tokens.shape[1]), np.int32)
    rmask = np.zeros_like(rt)
    for g, rec in enumerate(records):
        rows = list(range(g * k, (g + 1) * k))
        for slot, text in enumerate(rec["completions"]):
            row = next(r for r in rows if responses[r] == text)
            rows.remove(row)
            rt[g, slot], rmask[g, slot] = tokens[row], mask[row]
    return {"prompt_tokens": pt, "prompt_mask": pm, "response_tokens": rt, "response_mask": rmask}


def plot_ppo(curve: Sequence[Mapping[str, float]], path: str) -> str:
    """PNG of reward-model score, gold score and KL (nats per response) over PPO iterations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (
        ("reward", "reward-model score (rollouts)"),
        ("gold", "gold score (evaluation samples)"),
        ("kl", "KL to reference, nats / response"),
    )
    for ax, (name, title) in zip(axes, panels, strict=True):
        pts = [(c["iteration"], c[name]) for c in curve if c.get(name) is not None]
        if pts:
            x, y = zip(*pts, strict=True)
            ax.plot(x, y, marker="o" if name == "gold" else None, ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------


def _logger(cfg: QuickstartConfig, stage: str, total: int, enabled: bool):
    if not enabled:
        return None
    from rlhf_jax.logging import RunLogger

    return RunLogger(
        os.path.join(cfg.run_dir, stage), tensorboard=False, progress_total=total, progress=True
    )


def _close(logger) -> None:
    if logger is not None:
        logger.close()


def run(
    cfg: QuickstartConfig = QuickstartConfig(),
    *,
    log: bool = True,
    verbose: bool = True,
) -> dict[str, Any]:
    """Run the whole pipeline and write its report; returns the report dict.

    Writes into ``cfg.run_dir``: ``tokenizer/`` (Hugging Face format), ``sft/``, ``rm/``, ``ppo/``
    (each stage's ``metrics.jsonl`` when ``log``), ``report.json``, ``report.md`` and
    ``ppo_curves.png``.
    """
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    os.makedirs(cfg.run_dir, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    key = jax.random.PRNGKey(cfg.seed)
    k_init, k_sft, k_rm, k_norm, k_eval = jax.random.split(key, 5)
    mesh = make_mesh(cfg.parallel.mesh, mesh_devices(cfg.parallel.mesh))

    # -- tokenizer and model --
    tokenizer = toy.load_tokenizer(toy.build_tokenizer(os.path.join(cfg.run_dir, "tokenizer")))
    init = models.init_model(policy_config(cfg, tokenizer), k_init)
    eval_prompts = [p for p in toy.all_prompts() for _ in range(cfg.eval_samples_per_prompt)]
    chunk = len(eval_prompts)  # one compiled sampler shape for every sampling call

    # -- SFT --
    t0 = time.perf_counter()
    train = sft_arrays(tokenizer, cfg.sft_examples, seed=cfg.seed)
    held_out = sft_arrays(tokenizer, 512, seed=cfg.seed + 10_000)
    logger = _logger(cfg, "sft", cfg.sft.loop.max_steps, log)
    try:
        sft_model, sft_res = sft_lib.run(
            cfg.sft,
            init,
            epoch_batches(train, cfg.sft.batch_size, seed=cfg.seed),
            key=k_sft,
            eval_batch=held_out,
            logger=logger,
            mesh=mesh,
            parallel_cfg=cfg.parallel,
        )
    finally:
        _close(logger)
    seconds["sft"] = time.perf_counter() - t0
    sft_summary = {"train_loss": sft_res.history[-1]["loss"]}
    if sft_res.evals:
        sft_summary.update({f"eval_{k}": v for k, v in sft_res.evals[-1].items() if k != "step"})
    say(f"[sft] {sft_res.step} steps in {seconds['sft']:.1f}s: {_fmt(sft_summary)}")

    # -- reward model: rankings of SFT samples, then normalised on fresh SFT samples --
    t0 = time.perf_counter()
    sample = functools.partial(
        ranking_data,
        sft_model.graphdef,
        sft_model.params,
        tokenizer,
        k=cfg.rm_k,
        label_temperature=cfg.label_temperature,
        sample_temperature=cfg.temperature,
        chunk=chunk,
    )
    rank = sample(cfg.rm_groups, seed=cfg.seed + 1)
    rank_eval = sample(cfg.rm_eval_groups, seed=cfg.seed + 2)
    norm_tokens, norm_mask = sample_responses(
        sft_model.graphdef,
        sft_model.params,
        tokenizer,
        eval_prompts,
        k_norm,
        temperature=cfg.temperature,
        chunk=chunk,
    )
    seconds["rm_data"] = time.perf_counter() - t0
    logger = _logger(cfg, "rm", cfg.reward_model.loop.max_steps, log)
    try:
        rm_model, rm_res, rm_info = rm_lib.run(
            cfg.reward_model,
            sft_model,
            epoch_batches(rank, cfg.reward_model.batch_size, seed=cfg.seed + 1),
            key=k_rm,
            eval_batch=rank_eval,
            normalize_on={"tokens": norm_tokens, "attention_mask": norm_mask},
            logger=logger,
            mesh=mesh,
            parallel_cfg=cfg.parallel,
        )
    finally:
        _close(logger)
    seconds["reward_model"] = time.perf_counter() - t0
    say(f"[rm] {rm_res.step} steps in {seconds['reward_model']:.1f}s: {_fmt(rm_info)}")

    # -- the SFT baseline, PPO, and the PPO policy on the same prompts and sampling noise --
    evaluate = functools.partial(
        evaluate_policy,
        reference=sft_model,
        reward_model=rm_model,
        tokenizer=tokenizer,
        prompts=eval_prompts,
        key=k_eval,
        temperature=cfg.temperature,
        chunk=chunk,
    )
    before = evaluate((sft_model.graphdef, sft_model.params))
    t0 = time.perf_counter()
    policy, ppo_res, curve = _run_ppo(cfg, tokenizer, sft_model, rm_model, evaluate, log, mesh)
    b0 = before.summary()
    curve.insert(0, {"iteration": 0, "reward": b0["reward"], "kl": 0.0, "gold": b0["gold"]})
    seconds["ppo"] = time.perf_counter() - t0
    say(f"[ppo] {ppo_res.step} iterations in {seconds['ppo']:.1f}s")
    t0 = time.perf_counter()
    after = evaluate((policy.graphdef, policy.params))
    win = toy.gold_win_rate(eval_prompts, after.responses, before.responses)
    seconds["evaluation"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start

    # -- report --
    b, a = before.summary(), after.summary()
    report = {
        "seed": cfg.seed,
        "config": _jsonable(dataclasses.asdict(cfg)),
        "model": {
            "arch": cfg.arch,
            "parameters": int(sum(np.size(x) for x in jax.tree.leaves(sft_model.params))),
        },
        "sft": {"steps": sft_res.step, **sft_summary},
        "reward_model": {"steps": rm_res.step, **rm_info},
        "before": b,
        "after": a,
        "gold_win_rate": float(win),
        "kl_nats_per_response": a["kl"],
        "well_formed": a["well_formed"],
        "targets": {
            "gold_win_rate >= 0.8": bool(win >= 0.8),
            "kl <= 10 nats": bool(a["kl"] <= 10.0),
            "well_formed >= 0.95": bool(a["well_formed"] >= 0.95),
        },
        "eval_samples": len(eval_prompts),
        "samples": {
            "before": before.rows(cfg.shown_samples),
            "after": after.rows(cfg.shown_samples),
        },
        "top_responses": {"before": before.top(10), "after": after.top(10)},
        "malformed_after": after.malformed(10),
        "ppo_curve": curve,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    report["plot"] = plot_ppo(curve, os.path.join(cfg.run_dir, "ppo_curves.png"))
    with open(os.path.join(cfg.run_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    text = format_report(report)
    with open(os.path.join(cfg.run_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(text)
    say(text)
    return report


def _run_ppo(cfg, tokenizer, sft_model, rm_model, evaluate, log, mesh=None):
    """PPO from the SFT model against the reward model; returns (policy, LoopResult, curve)."""
    ppo_cfg = dataclasses.replace(
        cfg.ppo,
        response_length=toy.RESPONSE_LENGTH,
        stop_tokens=toy.stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        temperature=cfg.temperature,
        seed=cfg.seed,
        loop=dataclasses.replace(
            cfg.ppo.loop, max_steps=cfg.ppo_iterations, eval_every=cfg.ppo_eval_every
        ),
    )
    prompts_all = toy.all_prompts()
    pt_all, pm_all = toy.encode_prompts(tokenizer, prompts_all)
    b = cfg.ppo_prompts

    def batches(step: int) -> dict[str, np.ndarray]:
        order = np.random.default_rng([cfg.seed, 7, step]).choice(len(prompts_all), b)
        return {
            "prompt_tokens": pt_all[order],
            "prompt_mask": pm_all[order],
            "prompt_index": (step * b + np.arange(b)).astype(np.int32),
        }

    static, _, _ = ppo_lib.make_models(ppo_cfg, sft_model, rm_model)

    def eval_fn(state):
        s = evaluate((static.policy, state.params["policy"])).summary()
        return {"gold": s["gold"], "well_formed": s["well_formed"], "kl": s["kl"]}

    logger = _logger(cfg, "ppo", cfg.ppo_iterations, log)
    try:
        policy, res = ppo_lib.run(
            ppo_cfg,
            sft_model,
            rm_model,
            batches,
            eval_fn=eval_fn,
            logger=logger,
            mesh=mesh,
            parallel_cfg=cfg.parallel,
        )
    finally:
        _close(logger)
    gold = {int(e["step"]): e["gold"] for e in res.evals}
    curve = [
        {
            "iteration": int(h["step"]),
            "reward": h.get("score/mean"),
            "kl": h.get("kl/response"),
            "gold": gold.get(int(h["step"])),
        }
        for h in res.history
    ]
    return policy, res, curve


def _fmt(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def format_report(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the headline figures, targets, and samples before and after."""
    b, a = report["before"], report["after"]
    lines = [
        f"# rlhf-jax quickstart (seed {report['seed']})",
        "",
        f"model: {report['model']['arch']}, {report['model']['parameters']:,} parameters; "
        f"wall time {report['seconds']['total']:.0f} s "
        f"(SFT {report['seconds']['sft']:.0f}, RM {report['seconds']['reward_model']:.0f}, "
        f"PPO {report['seconds']['ppo']:.0f})",
        f"reward model held-out accuracy: {report['reward_model'].get('eval_accuracy', 0):.3f}",
        "",
        "| | SFT | PPO |",
        "|---|---|---|",
        f"| gold score | {b['gold']:.3f} | {a['gold']:.3f} |",
        f"| reward-model score | {b['reward']:.3f} | {a['reward']:.3f} |",
        f"| KL to reference (nats/response) | {b['kl']:.3f} | {a['kl']:.3f} |",
        f"| well-formed | {b['well_formed']:.1%} | {a['well_formed']:.1%} |",
        f"| good (gold >= {toy.GOOD_THRESHOLD}) | {b['good']:.1%} | {a['good']:.1%} |",
        "",
        f"gold win rate of PPO against SFT: {report['gold_win_rate']:.1%} "
        f"({report['eval_samples']} samples, ties count 1/2)",
        "",
        "targets: "
        + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in report["targets"].items()),
        "",
    ]
    for stage in ("before", "after"):
        lines.append(f"samples {stage} PPO ({'SFT' if stage == 'before' else 'PPO'} policy):")
        for row in report["samples"][stage]:
            lines.append(
                f"  {row['prompt']} -> {row['response']}   "
                f"(gold {row['gold']:+.2f}, reward {row['reward']:+.2f})"
            )
        lines.append("")
    lines.append("most frequent PPO responses (share, well-formed, gold, reward):")
    for row in report["top_responses"]["after"][:5]:
        lines.append(
            f"  {row['share']:6.1%}  {row['response']!r}  "
            f"{'ok' if row['well_formed'] else 'MALFORMED'}  "
            f"gold {row['gold']:+.2f}  reward {row['reward']:+.2f}"
        )
    lines.append("")
    lines.append(f"plot: {report['plot']}")
    return "\n".join(lines) + "\n"
