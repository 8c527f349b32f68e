"""Plain-numpy float64 loop references for the RLHF math, written from the formulas.

Each function is a direct, element-by-element transcription of an equation in
``docs/formulas.md`` (or of the docstring of the function it checks), with
explicit Python loops over the batch and time, so it shares no code path with the vectorised JAX
implementation in ``rlhf_jax``. Nothing here imports ``rlhf_jax``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def kl(logp: float, ref: float, estimator: str) -> float:
    d = logp - ref
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        r = math.exp(ref - logp)
        return (r - 1.0) - math.log(r)
    if estimator == "abs":
        return abs(d)
    raise ValueError(estimator)


def last_index(row) -> int:
    last = -1
    for t, v in enumerate(row):
        if v:
            last = t
    return last


def score_index(row, position: str) -> int:
    """t* for one mask row, -1 for none."""
    n = len(row)
    last = last_index(row)
    if position == "last_fixed":
        return n - 1
    if last < 0:
        return -1
    if position == "after_stop":
        return min(last + 1, n - 1)
    return last


def steps_row(row, position: str) -> list[int]:
    """GAE / value-loss steps of one row."""
    n = len(row)
    if position == "last_fixed":
        return [1] * n
    out = [1 if v else 0 for v in row]
    if position == "after_stop":
        t = score_index(row, position)
        if t >= 0:
            out[t] = 1
    return out


def shape_rewards(
    scores,
    logprobs,
    ref_logprobs,
    mask,
    beta,
    *,
    estimator="k1",
    position="last_token",
    kl_on="real",
    score_clip=None,
    reward_clip=None,
    penalty=None,
    penalty_mode="subtract",
    truncated=None,
):
    b_size, t_size = np.shape(logprobs)
    out = np.zeros((b_size, t_size))
    for b in range(b_size):
        s = float(scores[b])
        if penalty is not None and truncated[b]:
            s = s - penalty if penalty_mode == "subtract" else penalty
        if score_clip is not None:
            s = min(max(s, -score_clip), score_clip)
        star = score_index(mask[b], position)
        steps = steps_row(mask[b], position)
        for t in range(t_size):
            charged = kl_on == "all" or mask[b][t]
            r = -beta * kl(float(logprobs[b][t]), float(ref_logprobs[b][t]), estimator) * charged
            if t == star:
                r += s
            if reward_clip is not None:
                r = min(max(r, -reward_clip), reward_clip)
            out[b, t] = r * steps[t]
    return out


def gae(rewards, values, steps, gamma, lam, holes="skip"):
    """GAE row by row; ``steps`` [B, T] 0/1. Returns (advantages, returns)."""
    b_size, t_size = np.shape(rewards)
    adv = np.zeros((b_size, t_size))
    ret = np.zeros((b_size, t_size))
    for b in range(b_size):
        if holes == "skip":
            idx = [t for t in range(t_size) if steps[b][t]]
            next_v, next_a = 0.0, 0.0
            for t in reversed(idx):
                delta = rewards[b][t] + gamma * next_v - values[b][t]
                a = delta + gamma * lam * next_a
                adv[b, t] = a
                ret[b, t] = a + values[b][t]
                next_v, next_a = values[b][t], a
        else:
            r = [rewards[b][t] * steps[b][t] for t in range(t_size)]
            v = [values[b][t] * steps[b][t] for t in range(t_size)]
            last = 0.0
            for t in reversed(range(t_size)):
                nv = v[t + 1] if t < t_size - 1 else 0.0
                last = r[t] + gamma * nv - v[t] + gamma * lam * last
                adv[b, t] = last * steps[b][t]
                ret[b, t] = (last + v[t]) * steps[b][t]
    return adv, ret


def reward_to_go(rewards, steps):
    b_size, t_size = np.shape(rewards)
    out = np.zeros((b_size, t_size))
    for b in range(b_size):
        for t in range(t_size):
            if steps[b][t]:
                out[b, t] = sum(rewards[b][u] for u in range(t, t_size) if steps[b][u])
    return out


def whiten(x, mask, shift_mean=True, unbiased=False, eps=1e-8):
    vals = [float(v) for v, m in zip(np.ravel(x), np.ravel(mask), strict=True) if m]
    n = len(vals)
    mean = sum(vals) / max(n, 1)
    var = sum((v - mean) ** 2 for v in vals) / max(n, 1)
    if unbiased:
        var = var * n / max(n - 1, 1)
    out = np.zeros(np.shape(x))
    for i in np.ndindex(np.shape(x)):
        if mask[i]:
            out[i] = (x[i] - mean) / math.sqrt(var + eps) + (0.0 if shift_mean else mean)
    return out


def group_advantages(rewards, g, method="grpo", scale="group", eps=1e-4):
    n = len(rewards)
    out = np.zeros(n)
    all_mean = sum(rewards) / n
    batch_std = math.sqrt(sum((r - all_mean) ** 2 for r in rewards) / (n - 1)) if n > 1 else 0.0
    for start in range(0, n, g):
        grp = [float(r) for r in rewards[start : start + g]]
        mean = sum(grp) / g
        for i in range(g):
            if method == "rloo":
                out[start + i] = grp[i] - (sum(grp) - grp[i]) / (g - 1)
                continue
            a = grp[i] - mean
            if scale == "group":
                std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (g - 1))
                a = a / (std + eps)
            elif scale == "batch":
                a = a / (batch_std + eps)
            out[start + i] = a
    return out


def aggregate(per_token, mask, mode, max_len=None):
    b_size, t_size = np.shape(per_token)
    if mode in ("token_mean", "dapo"):
        s = sum(per_token[b][t] for b in range(b_size) for t in range(t_size) if mask[b][t])
        return s, float(sum(1 for b in range(b_size) for t in range(t_size) if mask[b][t]))
    if mode in ("seq_mean_token_mean", "grpo"):
        total = 0.0
        for b in range(b_size):
            ts = [t for t in range(t_size) if mask[b][t]]
            if ts:
                total += sum(per_token[b][t] for t in ts) / len(ts)
        return total, float(b_size)
    if mode == "dr_grpo":
        s = sum(per_token[b][t] for b in range(b_size) for t in range(t_size) if mask[b][t])
        return s, float(b_size * (max_len or t_size))
    if mode == "bnpo":
        s, c = aggregate(per_token, mask, "token_mean")
        return s / max(c, 1.0), 1.0
    raise ValueError(mode)


def policy_loss_tokens(logp, old, adv, mask, eps_lo, eps_hi, level="token", dual_clip=None):
    """Per-token clipped surrogate loss [B, T] (0 on masked tokens)."""
    b_size, t_size = np.shape(logp)
    out = np.zeros((b_size, t_size))
    for b in range(b_size):
        ts = [t for t in range(t_size) if mask[b][t]]
        seq = sum(logp[b][t] - old[b][t] for t in ts)
        if level == "sequence_mean":
            seq = seq / max(len(ts), 1)
        for t in ts:
            lr = logp[b][t] - old[b][t] if level == "token" else seq
            rho = math.exp(lr)
            a = adv[b][t]
            clipped = min(max(rho, 1 - eps_lo), 1 + eps_hi)
            loss = max(-a * rho, -a * clipped)
            if dual_clip is not None and a < 0:
                loss = min(loss, -dual_clip * a)
            out[b, t] = loss
    return out


def value_loss_tokens(v, old, ret, mask, c, clip=True):
    b_size, t_size = np.shape(v)
    out = np.zeros((b_size, t_size))
    for b in range(b_size):
        for t in range(t_size):
            if not mask[b][t]:
                continue
            e1 = (v[b][t] - ret[b][t]) ** 2
            vc = min(max(v[b][t], old[b][t] - c), old[b][t] + c)
            e2 = (vc - ret[b][t]) ** 2
            out[b, t] = 0.5 * (max(e1, e2) if clip else e1)
    return out


def entropy(logits):
    b_size, t_size, v_size = np.shape(logits)
    out = np.zeros((b_size, t_size))
    for b in range(b_size):
        for t in range(t_size):
            z = [float(x) for x in logits[b][t]]
            mx = max(z)
            ex = [math.exp(x - mx) for x in z]
            s = sum(ex)
            out[b, t] = -sum((e / s) * math.log(e / s) for e in ex)
    return out


def pairwise_rm(chosen, rejected, margin=None, center=0.0):
    total = 0.0
    for i in range(len(chosen)):
        m = 0.0 if margin is None else margin[i]
        total += -log_sigmoid(chosen[i] - rejected[i] - m) + center * (chosen[i] + rejected[i]) ** 2
    return total, float(len(chosen))


def ranking_pairs(rewards, mask=None, l2=0.0):
    total, count = 0.0, 0
    for n, row in enumerate(rewards):
        valid = [k for k in range(len(row)) if mask is None or mask[n][k]]
        pairs = list(itertools.combinations(valid, 2))
        if not pairs:
            continue
        terms = [
            -log_sigmoid(row[i] - row[j]) + l2 * 0.5 * (row[i] ** 2 + row[j] ** 2) for i, j in pairs
        ]
        total += sum(terms) / len(terms)
        count += 1
    return total, float(count)


def best_of_k(rewards, best):
    total = 0.0
    for n, row in enumerate(rewards):
        mx = max(row)
        lse = mx + math.log(sum(math.exp(r - mx) for r in row))
        total += lse - row[best[n]]
    return total, float(len(rewards))


def dpo(pc, pr, rc, rr, beta, loss_type, eps=0.0, len_c=None, len_r=None):
    total = 0.0
    for i in range(len(pc)):
        dc, dr = pc[i] - rc[i], pr[i] - rr[i]
        z = beta * (dc - dr)
        if loss_type == "sigmoid":
            total += -log_sigmoid(z)
        elif loss_type == "hinge":
            total += max(0.0, 1 - z)
        elif loss_type == "ipo":
            total += (dc / max(len_c[i], 1) - dr / max(len_r[i], 1) - 1 / (2 * beta)) ** 2
        elif loss_type == "robust":
            total += (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps)
        elif loss_type == "cdpo":
            total += -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    return total, float(len(pc))


def grpo_tokens(logp, old, ref, adv, mask, eps_lo, eps_hi, beta, ent=None, ent_coef=0.0):
    pg = policy_loss_tokens(logp, old, adv, mask, eps_lo, eps_hi)
    b_size, t_size = np.shape(logp)
    for b in range(b_size):
        for t in range(t_size):
            if mask[b][t]:
                x = ref[b][t] - logp[b][t]
                pg[b, t] += beta * (math.exp(x) - x - 1)
                if ent is not None:
                    pg[b, t] -= ent_coef * ent[b][t]
    return pg


def cost_model(cs, cu, ss, su, reg=0.0):
    total = 0.0
    for i in range(len(cs)):
        total += (
            -log_sigmoid(cu[i] - cs[i])
            - log_sigmoid(-ss[i] * cs[i])
            - log_sigmoid(-su[i] * cu[i])
            + reg * 0.5 * (cs[i] ** 2 + cu[i] ** 2)
        )
    return total, float(len(cs))
