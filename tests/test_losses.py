"""rlhf_jax.losses against float64 loop references (tests/reference_loops.py) and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference_loops as ref
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_jax import losses
from rlhf_jax.presets import AGGREGATIONS, Conventions

# Jitted entry points: one compile per configuration instead of one per eager op (faster tests,
# and every function is checked under jit).
RANK = jax.jit(losses.ranking_rm_loss, static_argnames="mode")
ENTROPY = jax.jit(losses.entropy)
PAIR = jax.jit(losses.pairwise_rm_loss)

MASK = np.array(
    [
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0],
    ],
    np.int32,
)


def _policy_inputs(seed=0):
    rng = np.random.default_rng(seed)
    lp = rng.normal(-1.5, 0.5, MASK.shape)
    old = lp + rng.normal(0, 0.3, MASK.shape)  # ratios well outside [0.8, 1.2]
    adv = rng.normal(0, 1, MASK.shape)
    return lp, old, adv


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_aggregate_matches_loop(mode):
    x, _, _ = _policy_inputs(1)
    s, c = losses.aggregate(jnp.float32(x), MASK, mode)
    ws, wc = ref.aggregate(x, MASK, mode)
    assert abs(float(s) - ws) < 1e-5 and float(c) == wc


def test_aggregate_is_exact_across_microbatches():
    """Summing (sum, count) over two halves gives the full batch's mean (token and seq modes)."""
    x, _, _ = _policy_inputs(2)
    for mode in ("token_mean", "seq_mean_token_mean", "dr_grpo"):
        s, c = losses.aggregate(x, MASK, mode)
        s1, c1 = losses.aggregate(x[:2], MASK[:2], mode)
        s2, c2 = losses.aggregate(x[2:], MASK[2:], mode)
        assert abs(float((s1 + s2) / (c1 + c2)) - float(s / c)) < 1e-6
    # bnpo: the mean over microbatches of each microbatch's token mean (TRL GRPO 'bnpo').
    s1, c1 = losses.aggregate(x[:2], MASK[:2], "bnpo")
    s2, c2 = losses.aggregate(x[2:], MASK[2:], "bnpo")
    m1 = ref.aggregate(x[:2], MASK[:2], "token_mean")
    m2 = ref.aggregate(x[2:], MASK[2:], "token_mean")
    want = 0.5 * (m1[0] / m1[1] + m2[0] / m2[1])
    assert abs(float((s1 + s2) / (c1 + c2)) - want) < 1e-5


POLICY_CASES = [
    dict(level="token", eps_hi=None, dual=None, agg="token_mean"),
    dict(level="token", eps_hi=0.28, dual=None, agg="seq_mean_token_mean"),
    dict(level="token", eps_hi=None, dual=3.0, agg="token_mean"),
    dict(level="sequence_mean", eps_hi=None, dual=None, agg="dr_grpo"),
    dict(level="sequence_sum", eps_hi=None, dual=None, agg="seq_mean_token_mean"),
]


@pytest.mark.parametrize("case", POLICY_CASES, ids=[str(c) for c in POLICY_CASES])
def test_ppo_policy_loss_matches_loop(case):
    lp, old, adv = _policy_inputs(3)
    if case["dual"]:
        old = old - 1.5 * (np.arange(6) % 2)  # ratios > e^1.5 > c = 3: the dual clip binds
    opts = Conventions(
        ratio_level=case["level"], dual_clip=case["dual"], loss_aggregation=case["agg"]
    )
    s, c, m = losses.ppo_policy_loss(
        jnp.float32(lp), jnp.float32(old), jnp.float32(adv), MASK, 0.2,
        clip_eps_high=case["eps_hi"], options=opts,
    )  # fmt: skip
    eps_hi = case["eps_hi"] or 0.2
    per = ref.policy_loss_tokens(lp, old, adv, MASK, 0.2, eps_hi, case["level"], case["dual"])
    ws, wc = ref.aggregate(per, MASK, case["agg"])
    assert abs(float(s) - ws) < 1e-4 and float(c) == wc
    # Token metrics, from the LMHP/TRL definitions.
    n = MASK.sum()
    d = (lp - old) * MASK
    assert abs(float(m["approx_kl"]) - 0.5 * np.sum(d**2)) < 1e-5
    assert abs(float(m["policy_kl"]) + np.sum(d)) < 1e-5
    assert float(m["token_count"]) == n
    if case["level"] == "token" and not case["dual"]:
        rho = np.exp(lp - old)
        clip = np.clip(rho, 0.8, 1 + eps_hi)
        frac = np.sum(((-adv * clip) > (-adv * rho)) * MASK)
        assert float(m["clip_frac"]) == frac
        low = np.sum((rho < 0.8) & (adv < 0) & (MASK > 0))
        high = np.sum((rho > 1 + eps_hi) & (adv > 0) & (MASK > 0))
        assert float(m["clip_frac_low"]) == low and float(m["clip_frac_high"]) == high
    if case["dual"]:
        assert float(m["dual_clip_frac"]) > 0


def test_ppo_policy_loss_entropy_metric_and_bonus():
    lp, old, adv = _policy_inputs(17)
    ent = np.random.default_rng(17).uniform(0, 2, MASK.shape)
    s0, c0, _ = losses.ppo_policy_loss(lp, old, adv, MASK, 0.2)
    s1, c1, m1 = losses.ppo_policy_loss(lp, old, adv, MASK, 0.2, entropies=ent)
    s2, _, _ = losses.ppo_policy_loss(lp, old, adv, MASK, 0.2, entropies=ent, entropy_coef=0.1)
    assert float(s1) == float(s0) and float(c1) == float(c0)
    assert abs(float(m1["entropy"]) - np.sum(ent * MASK)) < 1e-4
    assert abs(float(s2) - (float(s0) - 0.1 * np.sum(ent * MASK))) < 1e-4


def test_ppo_policy_loss_per_sequence_advantages():
    lp, old, adv = _policy_inputs(4)
    a_seq = adv[:, 0]
    s1, c1, _ = losses.ppo_policy_loss(lp, old, a_seq, MASK, 0.2)
    s2, c2, _ = losses.ppo_policy_loss(lp, old, np.repeat(a_seq[:, None], 6, 1), MASK, 0.2)
    assert abs(float(s1) - float(s2)) < 1e-6 and float(c1) == float(c2)


@pytest.mark.parametrize("clip", [True, False])
def test_value_loss_matches_loop(clip):
    rng = np.random.default_rng(5)
    v, old, ret = rng.normal(0, 1, (3, *MASK.shape))
    opts = Conventions(clip_value=clip, loss_aggregation="seq_mean_token_mean")
    s, c, m = losses.value_loss(v, old, ret, MASK, 0.2, options=opts)
    per = ref.value_loss_tokens(v, old, ret, MASK, 0.2, clip)
    ws, wc = ref.aggregate(per, MASK, "seq_mean_token_mean")
    assert abs(float(s) - ws) < 1e-5 and float(c) == wc
    assert abs(float(m["value_error"]) - np.sum((v - ret) ** 2 * MASK)) < 1e-4
    if clip:
        vc = np.clip(v, old - 0.2, old + 0.2)
        frac = np.sum(((vc - ret) ** 2 > (v - ret) ** 2) * MASK)
        assert float(m["value_clip_frac"]) == frac


def test_entropy_matches_loop_and_bf16():
    rng = np.random.default_rng(6)
    logits = rng.normal(0, 3, (*MASK.shape, 9))
    got = ENTROPY(jnp.float32(logits), MASK)
    np.testing.assert_allclose(got, ref.entropy(logits) * MASK, rtol=1e-5, atol=1e-5)
    lb = jnp.bfloat16(logits)
    gb = ENTROPY(lb)
    assert gb.dtype == jnp.float32
    want = ref.entropy(np.float64(lb.astype(jnp.float32)))
    np.testing.assert_allclose(gb, want, rtol=1e-5, atol=1e-5)
    uniform = ENTROPY(jnp.zeros((1, 1, 9)))
    assert abs(float(uniform[0, 0]) - math.log(9)) < 1e-6


def test_pairwise_rm_loss():
    rng = np.random.default_rng(7)
    rc, rr, margin = rng.normal(0, 2, (3, 8))
    s, c, m = losses.pairwise_rm_loss(rc, rr, margin=margin, center_coef=0.01)
    ws, wc = ref.pairwise_rm(rc, rr, margin, 0.01)
    assert abs(float(s) - ws) < 1e-4 and float(c) == wc
    assert float(m["accuracy"]) == np.sum(rc > rr)


def test_ranking_rm_loss_pairs_matches_loop():
    rng = np.random.default_rng(8)
    r = rng.normal(0, 2, (3, 5))
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    s, c, _ = RANK(r, l2_coef=0.001)
    ws, wc = ref.ranking_pairs(r, l2=0.001)
    assert abs(float(s) - ws) < 1e-4 and float(c) == wc == 3
    s, c, _ = RANK(r, mask=valid)
    ws, wc = ref.ranking_pairs(r, valid)
    assert abs(float(s) - ws) < 1e-4 and float(c) == wc == 2


def test_kwise_with_two_is_pairwise():
    rng = np.random.default_rng(9)
    r = rng.normal(0, 2, (6, 2))
    pair = PAIR(r[:, 0], r[:, 1])
    for mode in ("pairs", "best_of_k"):
        s, c, m = RANK(r, mode=mode)
        assert abs(float(s) - float(pair[0])) < 1e-5 and float(c) == float(pair[1])
        assert float(m["accuracy"]) == float(pair[2]["accuracy"])


def test_best_of_k_matches_loop():
    rng = np.random.default_rng(10)
    r = rng.normal(0, 2, (5, 4))
    best = np.array([0, 3, 1, 2, 0])
    s, c, _ = RANK(r, mode="best_of_k", best=best)
    ws, wc = ref.best_of_k(r, best)
    assert abs(float(s) - ws) < 1e-4 and float(c) == wc


@pytest.mark.parametrize("loss_type", losses.DPO_LOSS_TYPES)
def test_dpo_loss_matches_loop(loss_type):
    rng = np.random.default_rng(11)
    pc, pr, rc, rr = rng.normal(-20, 3, (4, 6))
    lc, lr = rng.integers(0, 9, (2, 6))  # includes a zero length (clamped to 1)
    s, c, m = losses.dpo_loss(
        pc, pr, rc, rr, 0.1, loss_type=loss_type, label_smoothing=0.1,
        chosen_length=lc, rejected_length=lr,
    )  # fmt: skip
    ws, wc = ref.dpo(pc, pr, rc, rr, 0.1, loss_type, 0.1, lc, lr)
    assert abs(float(s) - ws) < 1e-4 * max(1.0, abs(ws)) and float(c) == wc
    assert abs(float(m["rewards_margin"]) - 0.1 * np.sum((pc - rc) - (pr - rr))) < 1e-4


def test_dpo_and_ipo_at_zero_margin():
    z = jnp.zeros(3)
    one = jnp.ones(3)
    beta = 0.25
    assert abs(float(losses.dpo_loss(z, z, z, z, beta)[0]) / 3 - math.log(2)) < 1e-6
    ipo = losses.dpo_loss(z, z, z, z, beta, loss_type="ipo", chosen_length=one, rejected_length=one)
    assert abs(float(ipo[0]) / 3 - 1 / (4 * beta**2)) < 1e-5
    for lt in ("robust", "cdpo"):
        out = losses.dpo_loss(z, z, z, z, beta, loss_type=lt, label_smoothing=0.2)
        assert abs(float(out[0]) / 3 - math.log(2)) < 1e-6
    with pytest.raises(ValueError, match="chosen_length"):
        losses.dpo_loss(z, z, z, z, beta, loss_type="ipo")
    with pytest.raises(ValueError, match="loss_type='kto'"):
        losses.dpo_loss(z, z, z, z, beta, loss_type="kto")


def test_grpo_loss_matches_loop():
    lp, old, adv = _policy_inputs(12)
    rng = np.random.default_rng(12)
    refp = lp + rng.normal(0, 0.3, MASK.shape)
    ent = rng.uniform(0, 2, MASK.shape)
    a_seq = adv[:, 0]
    for agg in ("dapo", "grpo", "dr_grpo"):
        s, c, m = losses.grpo_loss(
            lp, old, refp, a_seq, MASK, 0.2, 0.04, clip_eps_high=0.28, entropies=ent,
            entropy_coef=0.01, options=Conventions(loss_aggregation=agg),
        )  # fmt: skip
        per = ref.grpo_tokens(
            lp, old, refp, np.repeat(a_seq[:, None], 6, 1), MASK, 0.2, 0.28, 0.04, ent, 0.01
        )
        ws, wc = ref.aggregate(per, MASK, agg)
        assert abs(float(s) - ws) < 1e-4 and float(c) == wc
    x = refp - lp
    assert abs(float(m["kl"]) - np.sum((np.exp(x) - x - 1) * MASK)) < 1e-4


def test_safe_rlhf_pieces():
    rng = np.random.default_rng(13)
    cs, cu = rng.normal(0, 2, (2, 7))
    ss, su = rng.choice([-1.0, 1.0], (2, 7))
    s, c, _ = losses.cost_model_loss(cs, cu, ss, su, reg_coef=0.01)
    ws, wc = ref.cost_model(cs, cu, ss, su, 0.01)
    assert abs(float(s) - ws) < 1e-4 and float(c) == wc
    ar, ac = rng.normal(0, 1, (2, 3, 4))
    lam = math.exp(0.3)
    np.testing.assert_allclose(
        losses.lagrangian_advantages(ar, ac, 0.3), (ar - lam * ac) / (1 + lam), rtol=1e-5, atol=1e-6
    )
    # One SGD step on SAFE's lambda loss -(J_C - d) exp(log_lambda), computed with optax.
    ll, jc, d, lr = 0.2, 1.7, 0.5, 0.1
    opt = optax.sgd(lr)
    g = jax.grad(lambda x: -(jc - d) * jnp.exp(x))(jnp.float32(ll))
    upd, _ = opt.update(g, opt.init(jnp.float32(ll)))
    want = float(optax.apply_updates(jnp.float32(ll), upd))
    assert abs(float(losses.log_lambda_update(ll, jc, d, lr)) - want) < 1e-6
    assert float(losses.log_lambda_update(ll, jc, d, lr, log_lambda_max=0.25)) == pytest.approx(
        0.25
    )
    # lambda gets no gradient through the advantage mix.
    gl = jax.grad(lambda x: jnp.sum(losses.lagrangian_advantages(ar, ac, x)))(0.3)
    assert float(gl) == 0.0


def test_jit_vmap_grad_and_all_masked_rows():
    lp, old, adv = _policy_inputs(14)
    z = np.zeros_like(MASK)
    opts = Conventions(loss_aggregation="seq_mean_token_mean", dual_clip=3.0)

    def pg(lp_, eps, mask):
        s, c, _ = losses.ppo_policy_loss(lp_, old, adv, mask, eps, options=opts)
        return s / jnp.maximum(c, 1.0)

    jpg = jax.jit(pg)
    assert abs(float(jpg(lp, 0.2, MASK)) - float(pg(lp, 0.2, MASK))) < 1e-6
    eps = jnp.array([0.1, 0.2, 0.3])
    swept = jax.vmap(jpg, in_axes=(None, 0, None))(jnp.float32(lp), eps, MASK)
    np.testing.assert_allclose(swept, [jpg(lp, float(e), MASK) for e in eps], rtol=1e-6)
    # Gradient at ratio 1 with token-mean aggregation: d/dlogp = -A m / sum(m).
    g = jax.jit(jax.grad(lambda x: losses.ppo_policy_loss(x, lp, adv, MASK, 0.2)[0]))(
        jnp.float32(lp)
    )
    np.testing.assert_allclose(g, -adv * MASK, rtol=1e-5, atol=1e-6)
    # All-masked: zero sums, finite gradients, for every loss that takes a mask.
    g0 = jax.jit(jax.grad(pg))(jnp.float32(lp), 0.2, z)
    assert bool(jnp.all(g0 == 0))

    def many(x):
        vs = losses.value_loss(x, old, adv, z, 0.2, options=opts)[0]
        gs = losses.grpo_loss(x, old, old, adv[:, 0], z, 0.2, 0.1, options=opts)[0]
        es = losses.aggregate(losses.entropy(jnp.stack([x, x], -1), z), z)[0]
        return vs + gs + es

    val, gm = jax.jit(jax.value_and_grad(many))(jnp.float32(lp))
    assert float(val) == 0.0 and bool(jnp.all(jnp.isfinite(gm)))
    # grad of the pairwise, ranking, DPO and cost losses.
    r = jnp.float32(np.random.default_rng(15).normal(0, 1, (4, 3)))
    for fn in (
        lambda x: losses.pairwise_rm_loss(x[:, 0], x[:, 1], center_coef=0.01)[0],
        lambda x: losses.ranking_rm_loss(x)[0],
        lambda x: losses.ranking_rm_loss(x, mode="best_of_k")[0],
        lambda x: losses.dpo_loss(x[:, 0], x[:, 1], x[:, 2], x[:, 2], 0.1, loss_type="robust")[0],
        lambda x: losses.cost_model_loss(x[:, 0], x[:, 1], jnp.ones(4), -jnp.ones(4))[0],
    ):
        gr = jax.jit(jax.grad(fn))(r)
        assert bool(jnp.all(jnp.isfinite(gr))) and float(jnp.abs(gr).sum()) > 0
    # The DPO gradient raises the chosen and lowers the rejected log-prob.
    gd = jax.jit(jax.grad(lambda x: losses.dpo_loss(x[:, 0], x[:, 1], r[:, 2], r[:, 2], 0.1)[0]))(r)
    assert bool(jnp.all(gd[:, 0] < 0)) and bool(jnp.all(gd[:, 1] > 0))
    # bf16 inputs accumulate in float32.
    sb, cb, _ = losses.ppo_policy_loss(
        jnp.bfloat16(lp), jnp.bfloat16(old), jnp.bfloat16(adv), MASK, 0.2
    )
    assert sb.dtype == jnp.float32 and cb.dtype == jnp.float32


@settings(max_examples=12, deadline=None, derandomize=True)
@given(st.floats(0.05, 0.5), st.integers(0, 2**31 - 1))
def test_property_ratio_one_is_minus_mean_advantage(eps, seed):
    """At logp = old the ratio is 1: the loss is -mean(A), nothing is clipped, approx_kl = 0."""
    rng = np.random.default_rng(seed)
    lp = rng.normal(-1, 1, MASK.shape)
    adv = rng.normal(0, 1, MASK.shape)
    s, c, m = losses.ppo_policy_loss(lp, lp, adv, MASK, eps)
    assert abs(float(s / c) + np.sum(adv * MASK) / MASK.sum()) < 1e-5
    assert float(m["clip_frac"]) == 0.0 and float(m["approx_kl"]) == 0.0


def _all_losses(x):
    """Every loss of the module on inputs derived from x [B, T], summed into one scalar."""
    opts = Conventions(ratio_level="sequence_mean", dual_clip=2.0, loss_aggregation="grpo")
    y = jnp.roll(x, 1, axis=1)
    total = 0.0
    for s, c, _ in (
        losses.ppo_policy_loss(x, y, y, MASK, 0.2, clip_eps_high=0.3, options=opts),
        losses.value_loss(x, y, 0.5 * y, MASK, 0.2),
        losses.pairwise_rm_loss(x[:, 0], x[:, 1], margin=x[:, 2], center_coef=0.01),
        losses.ranking_rm_loss(x[:, :3], l2_coef=0.01),
        losses.ranking_rm_loss(x[:, :3], mode="best_of_k"),
        losses.dpo_loss(
            losses.sequence_logps(x, MASK),
            x[:, 0],
            y[:, 0],
            y[:, 1],
            0.1,
            loss_type="ipo",
            chosen_length=MASK.sum(1),
            rejected_length=jnp.ones(4),
        ),  # fmt: skip
        losses.grpo_loss(
            x,
            y,
            y,
            y[:, 0],
            MASK,
            0.2,
            0.1,
            entropies=losses.entropy(jnp.stack([x, y, x * y], -1)),
            entropy_coef=0.01,
        ),  # fmt: skip
        losses.cost_model_loss(x[:, 0], x[:, 1], jnp.ones(4), -jnp.ones(4), reg_coef=0.1),
    ):
        total = total + s / jnp.maximum(c, 1.0)
    adv = losses.lagrangian_advantages(x, y, x[0, 0])
    return total + jnp.sum(adv) + losses.log_lambda_update(x[0, 0], x[0, 1], 0.0, 0.1)


def test_every_loss_under_jit_vmap_grad():
    rng = np.random.default_rng(16)
    xs = jnp.float32(rng.normal(-1, 0.5, (2, *MASK.shape)))
    jitted = jax.jit(_all_losses)
    single = [float(jitted(x)) for x in xs]
    np.testing.assert_allclose(single[0], float(_all_losses(xs[0])), rtol=1e-5)  # eager
    np.testing.assert_allclose(jax.jit(jax.vmap(_all_losses))(xs), single, rtol=1e-5)
    g = jax.jit(jax.grad(_all_losses))(xs[0])
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
