"""Tests of rlhf_jax.rollout: the sampling distribution, keys, and the rollout against the learner.

Tolerances: float32 log-probs 1e-5 against the learner's ``token_logprobs`` (same model code, a
cached decode vs. one full forward); the frequency test states its own (5 binomial standard errors,
fixed seed); the stratified inverse-CDF test is exact up to one grid cell.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, rollout
from rlhf_jax.rollout import SamplingConfig

# ---------------------------------------------------------------------------------------------
# The per-step sampling distribution against a float64 numpy definition
# ---------------------------------------------------------------------------------------------

LOGITS = np.array([2.0, 1.5, 1.5, 0.3, -0.2, 1.1, -1.0, 0.7, 2.4, -3.0], np.float32)  # V = 10


def ref_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The filtered distribution by its definition (transformers' warper order), float64: [V]."""
    x = np.asarray(logits, np.float64) / temperature
    keep = np.ones(x.shape, bool)
    order = np.argsort(-x, kind="stable")
    if top_k:
        keep[order[top_k:]] = False
    p = np.where(keep, np.exp(x - x.max()), 0.0)
    p /= p.sum()
    sp = p[order]
    crossing = (np.cumsum(sp) - sp < top_p) & keep[order]
    tau = x[order][crossing].min()
    keep &= x >= tau
    if min_p > 0:
        keep &= x >= x.max() + np.log(min_p)
    q = np.where(keep, np.exp(x - x.max()), 0.0)
    return q / q.sum()


# One compiled program per configuration: far faster than op-by-op dispatch.
sample_next = jax.jit(rollout.sample_next, static_argnames="block")
filtered_logprobs = jax.jit(rollout.filtered_logprobs)

CASES = [
    dict(),
    dict(temperature=0.7),
    dict(top_p=0.8),
    dict(min_p=0.3, temperature=1.3),
    dict(top_k=3),
    dict(top_k=5, top_p=0.7),
    dict(top_k=6, top_p=0.9, min_p=0.25, temperature=0.8),
    dict(top_p=0.85, min_p=0.2),
]


def _config(case):
    return SamplingConfig(**case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_filtered_logprobs_matches_definition(case):
    got = filtered_logprobs(jnp.asarray(LOGITS)[None], _config(case))[0]
    want = ref_probs(LOGITS, **case)
    np.testing.assert_allclose(np.exp(np.asarray(got)), want, atol=1e-6)
    assert np.all(np.isneginf(np.asarray(got)[want == 0]))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_inverse_cdf_on_a_grid_is_exact(case):
    """With u on a stratified grid, token frequencies equal the probabilities within 1/N."""
    n = 4000
    u = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, LOGITS.size))
    want = ref_probs(LOGITS, **case)
    for block in (4,):  # three blocks, the last one padded (one block: the test below)
        tokens, lp, llp = sample_next(logits, u, _config(case), block=block)
        freq = np.bincount(np.asarray(tokens), minlength=LOGITS.size) / n
        np.testing.assert_allclose(freq, want, atol=1.0 / n + 1e-6)
        np.testing.assert_allclose(np.asarray(lp), np.log(want[np.asarray(tokens)]), atol=1e-5)
        x = LOGITS.astype(np.float64) / case.get("temperature", 1.0)
        learner = x - (x.max() + np.log(np.exp(x - x.max()).sum()))
        np.testing.assert_allclose(np.asarray(llp), learner[np.asarray(tokens)], atol=1e-5)


@pytest.mark.parametrize("case", CASES[:1] + CASES[2:], ids=str)
def test_sampling_frequencies_with_keys(case):
    """Draws through the positional keys: every frequency within 5 standard errors (seed 0)."""
    n = 20000
    keys = rollout.sample_keys(jax.random.key(0), jnp.arange(n // 4), 4)
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 3)))(keys)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, LOGITS.size))
    tokens, _, _ = sample_next(logits, u, _config(case))
    freq = np.bincount(np.asarray(tokens), minlength=LOGITS.size) / n
    want = ref_probs(LOGITS, **case)
    stderr = np.sqrt(want * (1 - want) / n)
    assert np.all(np.abs(freq - want) <= 5 * stderr + 1e-12), (freq, want)
    assert np.all(freq[want == 0] == 0)


def test_top_p_bisection_on_a_large_vocabulary():
    """The sort-free top-p set equals the sorted definition on random [4, 3000] logits.

    float32 sums of 3000 terms are good to ~1e-6, so the values of top_p are chosen with every
    row's cumulative masses at least 1e-5 away from them (checked): no token is at the edge.
    """
    logits = 3.0 * jax.random.normal(jax.random.key(1), (4, 3000))
    for top_p in (0.3, 0.9, 0.95):
        for row in np.asarray(logits, np.float64):
            p = np.sort(np.exp(row - row.max()))[::-1]
            assert np.min(np.abs(np.cumsum(p / p.sum()) - p / p.sum() - top_p)) > 1e-5
        cfg = SamplingConfig(top_p=top_p)
        want = np.stack([ref_probs(row, top_p=top_p) for row in np.asarray(logits)])
        got = np.exp(np.asarray(filtered_logprobs(logits, cfg)))
        np.testing.assert_allclose(got, want, atol=1e-6)
        u = jnp.linspace(0.0, 0.999999, 4)
        tokens, lp, _ = sample_next(logits, u, cfg)
        assert np.all(want[np.arange(4), np.asarray(tokens)] > 0)
        np.testing.assert_allclose(
            np.asarray(lp), np.log(want[np.arange(4), np.asarray(tokens)]), atol=1e-5
        )


def test_greedy_is_argmax_and_filters_do_not_change_it():
    logits = jax.random.normal(jax.random.key(2), (8, 50))
    u = jnp.full((8,), 0.5)
    for kw in (dict(), dict(top_k=4, top_p=0.5), dict(min_p=0.5, top_p=0.3)):
        tokens, _, _ = sample_next(logits, u, SamplingConfig(greedy=True, **kw))
        np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), -1))


def test_sampling_parameters_are_traceable():
    """One compiled function, vmapped over temperatures and top-p values (a sweep)."""

    @jax.jit
    @jax.vmap
    def lp(temperature, top_p):
        cfg = SamplingConfig(temperature=temperature, top_p=top_p)
        return filtered_logprobs(jnp.asarray(LOGITS)[None], cfg)[0]

    temps, tops = jnp.array([0.5, 1.0, 2.0]), jnp.array([1.0, 0.8, 0.5])
    got = np.exp(np.asarray(lp(temps, tops)))
    for i in range(3):
        want = ref_probs(LOGITS, temperature=float(temps[i]), top_p=float(tops[i]))
        np.testing.assert_allclose(got[i], want, atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=-1)


def test_keys_are_positional():
    key = jax.random.key(7)
    all_keys = rollout.sample_keys(key, jnp.arange(6), 3)  # [18]
    some = rollout.sample_keys(key, jnp.array([4, 1]), 3)  # prompts 4 and 1
    data = jax.random.key_data
    np.testing.assert_array_equal(data(some[:3]), data(all_keys[12:15]))
    np.testing.assert_array_equal(data(some[3:]), data(all_keys[3:6]))
    want = jax.random.fold_in(jax.random.fold_in(key, 4), 2)
    np.testing.assert_array_equal(data(some[2]), data(want))


# ---------------------------------------------------------------------------------------------
# The rollout with a tiny GPT-2, against the learner's full forward
# ---------------------------------------------------------------------------------------------

VOCAB, P, R = 64, 6, 8
STOPS = (3, 5, 11)  # with a near-uniform random model, ~5% per step: some rows stop, some not


@pytest.fixture(scope="module")
def lm():
    config = models.ModelConfig(
        arch="gpt2",
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = models.init_model(config, jax.random.key(0))
    return model.graphdef, model.params


def prompts(b, seed=1):
    """[b, P] left-padded prompts with 1..P real tokens (never a stop token): tokens, mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, P + 1, b)
    mask = (np.arange(P)[None, :] >= P - lengths[:, None]).astype(np.int32)
    tokens = rng.integers(12, VOCAB, (b, P)) * mask
    return jnp.asarray(tokens, jnp.int32), jnp.asarray(mask)


def learner_logprobs(lm, tokens, mask, ro, temperature):
    full, full_mask = rollout.full_sequences(tokens, mask, ro)
    fn = jax.jit(models.token_logprobs, static_argnums=0, static_argnames="start")
    return fn(*lm, full, full_mask, start=P, temperature=temperature)


def run(lm, tokens, mask, key=0, **kw):
    kw = dict(max_new_tokens=R, stop_tokens=STOPS, n=2) | kw
    return rollout.sample(*lm, tokens, mask, key, **kw)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_equal_the_learners(lm, temperature):
    tokens, mask = prompts(4)
    cfg = SamplingConfig(temperature=temperature)
    ro = run(lm, tokens, mask, sampling=cfg)
    want = np.asarray(learner_logprobs(lm, tokens, mask, ro, temperature))
    m = np.asarray(ro.mask).astype(bool)
    np.testing.assert_allclose(np.asarray(ro.learner_logprobs)[m], want[m], atol=1e-5)
    np.testing.assert_allclose(np.asarray(ro.logprobs)[m], want[m], atol=1e-5)  # no filter
    assert np.all(np.asarray(ro.logprobs)[~m] == 0)


def test_filtered_logprobs_and_learner_logprobs(lm):
    """With top-k, ``learner_logprobs`` is still the learner's; ``logprobs`` the renormalised."""
    tokens, mask = prompts(4)
    cfg = SamplingConfig(temperature=0.8, top_k=5)
    ro = run(lm, tokens, mask, sampling=cfg)
    want = np.asarray(learner_logprobs(lm, tokens, mask, ro, 0.8))
    m = np.asarray(ro.mask).astype(bool)
    np.testing.assert_allclose(np.asarray(ro.learner_logprobs)[m], want[m], atol=1e-5)
    assert np.all(np.asarray(ro.logprobs)[m] > want[m])  # mass of 5 of 64 tokens renormalised


def test_greedy_equals_full_forward_argmax(lm):
    tokens, mask = prompts(4)
    ro = run(lm, tokens, mask, sampling=SamplingConfig(greedy=True), stop_tokens=(), n=1)
    np.testing.assert_array_equal(np.asarray(ro.lengths), R)  # no stop tokens: all truncated
    assert np.asarray(ro.truncated).all()
    full, full_mask = rollout.full_sequences(tokens, mask, ro)
    logits = np.asarray(jax.jit(models.logits, static_argnums=0)(*lm, full, full_mask))
    # position P-1+t predicts response token t: the same argmax, step by step
    np.testing.assert_array_equal(np.asarray(ro.tokens), logits[:, P - 1 : P + R - 1].argmax(-1))


def test_stop_tokens_mask_and_truncation(lm):
    tokens, mask = prompts(4)
    ro = run(lm, tokens, mask, key=3)
    toks, m = np.asarray(ro.tokens), np.asarray(ro.mask)
    is_stop = np.isin(toks, STOPS) & (m == 1)
    assert 0 < is_stop.any(-1).sum() < len(toks)  # both kinds of rows occur
    for row in range(len(toks)):
        stops = np.flatnonzero(np.isin(toks[row], STOPS))
        length = stops[0] + 1 if stops.size else R
        np.testing.assert_array_equal(m[row], np.arange(R) < length)
        assert bool(ro.truncated[row]) == (stops.size == 0)
        assert np.all(toks[row, length:] == 0)  # pad_token_id
    np.testing.assert_array_equal(np.asarray(ro.lengths), m.sum(-1))
    np.testing.assert_array_equal(np.asarray(ro.prompt_index), np.repeat(np.arange(4), 2))
    # an integer seed is the typed key jax.random.key(seed)
    np.testing.assert_array_equal(
        np.asarray(run(lm, tokens, mask, key=jax.random.key(3)).tokens), toks
    )


def test_early_exit(lm):
    tokens, mask = prompts(4)
    everything = tuple(range(VOCAB))  # every token stops: one token each, the loop exits at once
    ro = run(lm, tokens, mask, stop_tokens=everything)
    np.testing.assert_array_equal(np.asarray(ro.lengths), 1)
    assert not np.asarray(ro.truncated).any()
    np.testing.assert_array_equal(np.asarray(ro.tokens)[:, 1:], 0)


def test_same_responses_for_any_batch_split_and_order(lm):
    """Batch 16 at once == batches of 4 in a shuffled order, matched by global prompt index."""
    tokens, mask = prompts(16)
    whole = run(lm, tokens, mask, key=5)
    order = np.random.default_rng(0).permutation(16)
    for chunk in order.reshape(4, 4):
        part = run(lm, tokens[chunk], mask[chunk], key=5, prompt_index=jnp.asarray(chunk))
        rows = (2 * chunk[:, None] + np.arange(2)).reshape(-1)
        np.testing.assert_array_equal(np.asarray(part.tokens), np.asarray(whole.tokens)[rows])
        np.testing.assert_array_equal(np.asarray(part.mask), np.asarray(whole.mask)[rows])
        np.testing.assert_allclose(
            np.asarray(part.logprobs), np.asarray(whole.logprobs)[rows], atol=1e-5
        )
    assert not np.array_equal(np.asarray(whole.tokens)[0::2], np.asarray(whole.tokens)[1::2])


def test_same_responses_on_8_devices(lm):
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as PS

    tokens, mask = prompts(16)
    want = run(lm, tokens, mask, key=9)
    types = (AxisType.Auto,) * 2  # as rlhf_jax.parallel.make_mesh
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=types, devices=jax.devices()[:8])
    batch = NamedSharding(mesh, PS(("data", "fsdp")))
    with jax.set_mesh(mesh):
        params = jax.device_put(lm[1], NamedSharding(mesh, PS()))
        got = run(
            (lm[0], params),
            jax.device_put(tokens, batch),
            jax.device_put(mask, batch),
            key=9,
        )
    assert got.tokens.sharding.spec[0] == ("data", "fsdp") or len(got.tokens.devices()) == 8
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
    np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), atol=1e-5)


def test_vmap_over_sampling_parameters_is_a_sweep(lm):
    """jit(vmap(sample)) over temperature and top-p == one run per setting."""
    tokens, mask = prompts(4)

    def one(temperature, top_p):
        return run(lm, tokens, mask, sampling=SamplingConfig(temperature=temperature, top_p=top_p))

    temps, tops = jnp.array([0.5, 1.0, 1.5]), jnp.array([1.0, 0.9, 0.7])
    swept = jax.jit(jax.vmap(one))(temps, tops)
    for i in range(3):
        want = one(temps[i], tops[i])
        np.testing.assert_array_equal(np.asarray(swept.tokens[i]), np.asarray(want.tokens))
        np.testing.assert_allclose(
            np.asarray(swept.logprobs[i]), np.asarray(want.logprobs), atol=1e-5
        )


def test_rejects_sequences_longer_than_the_learned_positions(lm):
    tokens, mask = prompts(4)
    with pytest.raises(ValueError, match="learned positions"):
        rollout.sample(*lm, tokens, mask, 0, max_new_tokens=64 - P + 1)


def test_decode_loop_copies_no_cache(lm):
    """The speed contract of the decode loop (docs/rollout.md): the KV cache is updated in place in
    the ``while_loop`` carry, so the compiled rollout holds no copy of a buffer as large as one
    layer's cache (the layer-scan decode copied the whole ``[L, N, S, Hkv, Dh]`` cache every step)."""
    import math
    import re

    tokens, mask = prompts(4)
    n = 2
    fn = jax.jit(lambda p: rollout.sample(lm[0], p, tokens, mask, 0, max_new_tokens=R, n=n))
    hlo = fn.lower(lm[1]).compile().as_text()
    layer_cache = 4 * n * 4 * (P + R - 1) * 8  # N * Hkv * S * Dh
    big = []
    for shape in re.findall(r"= f32\[([\d,]+)\]\S* copy\(", hlo):
        if math.prod(int(d) for d in shape.split(",")) >= layer_cache:
            big.append(shape)
    assert not big, f"copies of cache-sized buffers: {big}"


def test_float64_mode_samples_the_same(lm):
    """With jax_enable_x64 (a config context: other tests keep 32-bit defaults) the rollout runs,
    draws the same tokens, and its learner log-probs are still the learner's."""
    tokens, mask = prompts(3)
    ro32 = run(lm, tokens, mask, key=5)
    with jax.enable_x64(True):
        ro64 = run(lm, tokens, mask, key=5)
        want = learner_logprobs(lm, tokens, mask, ro64, 1.0)
    np.testing.assert_array_equal(ro64.tokens, ro32.tokens)
    np.testing.assert_array_equal(ro64.mask, ro32.mask)
    np.testing.assert_allclose(ro64.logprobs, ro32.logprobs, atol=1e-5, rtol=0)
    m = np.asarray(ro64.mask) > 0
    np.testing.assert_allclose(np.asarray(ro64.learner_logprobs)[m], np.asarray(want)[m], atol=1e-5)
