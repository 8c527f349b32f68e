"""rlhf_jax.models: alignment of the pure functions, padding, KV cache, heads, config errors.

Logit parity with Hugging Face transformers lives in tests/test_hf.py (golden fixtures); here the
references are the model's own full forward (for the cache and padding invariances) and plain
numpy re-derivations (log-softmax gathers, read positions).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models

V = 32
ARCH_KW = {
    "gpt2": dict(num_kv_heads=4),
    "llama": dict(
        num_kv_heads=2,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ),
    "mistral": dict(num_kv_heads=2, sliding_window=3),  # the window cuts the 8-token rows
    "phi3": dict(num_kv_heads=2, head_dim=8, partial_rotary_factor=0.5),
    "gemma2": dict(
        num_kv_heads=2,
        sliding_window=3,
        layer_types=("sliding_attention", "full_attention"),
        attn_logit_softcap=2.0,
        final_logit_softcap=3.0,
        query_pre_attn_scalar=6.0,
    ),
    "gemma3": dict(
        num_kv_heads=1,
        sliding_window=3,
        layer_types=("full_attention", "sliding_attention"),
        rope_local_theta=100.0,
    ),
    "qwen2": dict(num_kv_heads=2),
    "qwen3": dict(num_kv_heads=1, head_dim=8),
    "mixtral": dict(num_kv_heads=2, sliding_window=3, num_experts=4, num_experts_per_tok=2),
}


def make_config(arch, **kw):
    base = dict(
        arch=arch,
        vocab_size=V,
        hidden_size=16,
        num_layers=2,
        num_heads=4,
        intermediate_size=24,
        max_position_embeddings=32,
    )
    base.update(ARCH_KW[arch])
    base.update(kw)
    return models.ModelConfig(**base)


# The two code paths (learned positions + LayerNorm; RoPE + RMSNorm + GQA + qk-norm). All four
# families are checked against transformers in test_hf.py.
@pytest.fixture(scope="module", params=["gpt2", "qwen3"])
def model(request):
    return models.init_model(
        make_config(request.param), jax.random.key(1), value_head=True, score_head=True
    )


_logits = jax.jit(models.logits, static_argnums=0)
_token_logprobs = jax.jit(models.token_logprobs, static_argnums=0, static_argnames="start")
_values = jax.jit(models.values, static_argnums=0, static_argnames="start")
_lpv = jax.jit(models.logprobs_and_values, static_argnums=0, static_argnames="start")
_scores = jax.jit(models.scores, static_argnums=0, static_argnames="read")

TOKENS = np.array([[0, 0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8], [0, 3, 9, 4, 2, 0, 0, 0]])
MASK = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0, 0, 0]])


@pytest.fixture(scope="module")
def full_logits(model):
    return np.asarray(
        jax.jit(models.logits, static_argnums=0)(model.graphdef, model.params, TOKENS, MASK)
    )


def test_logits_shape_dtype(model, full_logits):
    assert full_logits.shape == (3, 8, V)
    assert full_logits.dtype == np.float32
    assert np.all(np.isfinite(full_logits))


def test_token_logprobs_alignment_and_temperature(model, full_logits):
    start = 3
    for temp in (1.0, 0.7):
        lp = _token_logprobs(
            model.graphdef, model.params, TOKENS, MASK, start=start, temperature=temp
        )
        z = full_logits.astype(np.float64) / temp
        z = z - z.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))  # [B, T, V]
        ref = np.stack(
            [
                [logp[b, start - 1 + i, TOKENS[b, start + i]] for i in range(8 - start)]
                for b in range(3)
            ]
        )
        np.testing.assert_allclose(lp, ref, atol=1e-5)


def test_left_padding_invariance(model, full_logits):
    """A left-padded row gives, at its real positions, the logits of the unpadded sequence."""
    alone = _logits(model.graphdef, model.params, TOKENS[:1, 3:], MASK[:1, 3:])
    np.testing.assert_allclose(full_logits[0, 3:], np.asarray(alone)[0], atol=1e-5)


def test_right_padding_does_not_change_real_positions(model, full_logits):
    alone = _logits(model.graphdef, model.params, TOKENS[2:, 1:5], MASK[2:, 1:5])
    np.testing.assert_allclose(full_logits[2, 1:5], np.asarray(alone)[0], atol=1e-5)


def test_prefill_then_decode_matches_full_forward(model, full_logits):
    p, t_total, extra = 4, 8, 2  # prefill 4 slots, decode 4 tokens one by one, 2 spare slots
    positions = np.asarray(models.positions_from_mask(MASK))
    kv_mask = np.concatenate([MASK, np.zeros((3, extra), np.int32)], 1)  # [B, S]
    cache = models.init_cache(model.config, 3, t_total + extra)
    assert cache["k"].shape == (
        2,
        3,
        t_total + extra,
        model.config.num_kv_heads,
        model.config.head_dim,
    )
    dec = jax.jit(models.decode, static_argnums=0, static_argnames="last_only")
    out, cache = dec(
        model.graphdef, model.params, TOKENS[:, :p], positions[:, :p], kv_mask, cache, 0
    )
    got = [np.asarray(out)]
    for t in range(p, t_total):
        out, cache = dec(
            model.graphdef,
            model.params,
            TOKENS[:, t : t + 1],
            positions[:, t : t + 1],
            kv_mask,
            cache,
            jnp.int32(t),
            last_only=True,
        )
        assert out.shape == (3, V)
        got.append(np.asarray(out)[:, None])
    got = np.concatenate(got, 1)
    real = MASK > 0
    np.testing.assert_allclose(got[real], full_logits[real], atol=1e-5)


@pytest.mark.parametrize("arch", sorted(ARCH_KW))
def test_decode_step_matches_decode_and_full_forward(arch):
    """The rollout's fast path (per-layer weights, [B, Hkv, S, Dh] cache, one token per row) gives
    the logits of the scan-based ``decode`` and of the full forward, for every family (GQA, RoPE
    scaling, qk-norm, biases)."""
    from rlhf_jax.models import apply

    model = models.init_model(make_config(arch), jax.random.key(2))
    cfg = model.config
    full = np.asarray(_logits(model.graphdef, model.params, TOKENS, MASK))
    p, t_total, extra = 4, 8, 2
    positions = np.asarray(models.positions_from_mask(MASK))
    kv_mask = np.concatenate([MASK, np.zeros((3, extra), np.int32)], 1)
    dec = jax.jit(models.decode, static_argnums=0, static_argnames="last_only")
    _, cache = dec(
        model.graphdef,
        model.params,
        TOKENS[:, :p],
        positions[:, :p],
        MASK[:, :p],
        models.init_cache(cfg, 3, p),
        0,
    )
    ref_cache = models.init_cache(cfg, 3, t_total + extra)
    _, ref_cache = dec(
        model.graphdef, model.params, TOKENS[:, :p], positions[:, :p], kv_mask, ref_cache, 0
    )
    scache = apply.step_cache(cache, t_total + extra)
    assert len(scache) == cfg.num_layers
    assert scache[0][0].shape == (3, cfg.num_kv_heads, t_total + extra, cfg.head_dim)
    weights = jax.jit(apply.step_weights, static_argnums=0)(model.graphdef, model.params)
    step = jax.jit(apply.decode_step, static_argnums=0, static_argnames="last_only")
    for t in range(p, t_total):
        got, scache = step(
            cfg,
            weights,
            TOKENS[:, t : t + 1],
            positions[:, t : t + 1],
            kv_mask,
            scache,
            jnp.int32(t),
            last_only=True,
        )
        ref, ref_cache = dec(
            model.graphdef,
            model.params,
            TOKENS[:, t : t + 1],
            positions[:, t : t + 1],
            kv_mask,
            ref_cache,
            jnp.int32(t),
            last_only=True,
        )
        assert got.shape == (3, V) and got.dtype == jnp.float32
        real = MASK[:, t] > 0
        # a padding query whose window holds no real slot attends to nothing real: its output
        # is an average of whatever the two caches hold there (no one reads it)
        rows = real if cfg.sliding_window else slice(None)
        np.testing.assert_allclose(np.asarray(got)[rows], np.asarray(ref)[rows], atol=1e-5)
        np.testing.assert_allclose(np.asarray(got)[real], full[real, t], atol=1e-5)
    # the caches hold the same keys/values in their two layouts, on the slots attended to (a
    # padding slot's deeper-layer keys depend on the cache length: nothing attends to them)
    seen = kv_mask > 0
    for layer, (k, v) in enumerate(scache):
        for got_kv, ref_kv in ((k, ref_cache["k"][layer]), (v, ref_cache["v"][layer])):
            np.testing.assert_allclose(
                np.asarray(got_kv).swapaxes(1, 2)[seen], np.asarray(ref_kv)[seen], atol=1e-5
            )


def test_values_alignment(model):
    start = 2
    vals = _values(model.graphdef, model.params, TOKENS, MASK, start=start)
    assert vals.shape == (3, 8 - start)
    # zero-initialised value head
    np.testing.assert_array_equal(np.asarray(vals), 0.0)
    lp, v2 = _lpv(model.graphdef, model.params, TOKENS, MASK, start=start)
    lp_ref = _token_logprobs(model.graphdef, model.params, TOKENS, MASK, start=start)
    np.testing.assert_allclose(lp, lp_ref, atol=1e-6)
    np.testing.assert_array_equal(v2, vals)


def test_scores_read_positions_and_gain_bias(model):
    g, p = model.graphdef, model.params
    idx = models.read_index(jnp.asarray(MASK))
    np.testing.assert_array_equal(idx, [7, 7, 4])
    np.testing.assert_array_equal(models.read_index(jnp.asarray(MASK), "last"), [7, 7, 7])
    s = np.asarray(_scores(g, p, TOKENS, MASK))
    # the score equals the row's own score on the trimmed sequence (last_nonpad ignores padding)
    s2 = _scores(g, p, TOKENS[2:, 1:5], MASK[2:, 1:5])
    np.testing.assert_allclose(s[2], np.asarray(s2)[0], atol=1e-5)
    gain, bias = models.score_gain_bias(p)
    assert float(gain) == 1.0 and float(bias) == 0.0
    p2 = models.set_score_gain_bias(p, 2.5, -1.0)
    np.testing.assert_allclose(_scores(g, p2, TOKENS, MASK), 2.5 * s - 1.0, atol=1e-5)

    with pytest.raises(ValueError, match="read="):
        _scores(g, p, TOKENS, MASK, read="first")
    if model.config.arch != "gpt2":
        return

    # normalisation parameters get no gradient (checked once)
    def loss(params):
        return _scores(g, params, TOKENS, MASK).sum()

    grads = dict(jax.tree_util.tree_flatten_with_path(jax.jit(jax.grad(loss))(p))[0])
    flat = {jax.tree_util.keystr(k): v for k, v in grads.items()}
    gain_grad = [v for k, v in flat.items() if "reward_gain" in k]
    assert gain_grad and float(gain_grad[0]) == 0.0


def test_critic_from_score_head_and_with_value_head():
    cfg = make_config("llama")
    rm = models.init_model(cfg, jax.random.key(2), lm_head=False, score_head=True)
    vals = _values(rm.graphdef, rm.params, TOKENS, MASK, start=1)
    # values[:, -1] is the head at position T-2: the score of the sequence without its last token
    s = _scores(rm.graphdef, rm.params, TOKENS[:, :-1], MASK[:, :-1], read="last")
    np.testing.assert_allclose(vals[:, -1], s, atol=1e-5)
    policy = models.init_model(cfg, jax.random.key(3))
    gd, params = models.with_value_head(policy)
    np.testing.assert_allclose(
        _token_logprobs(gd, params, TOKENS, MASK),
        _token_logprobs(policy.graphdef, policy.params, TOKENS, MASK),
        atol=0,
    )
    np.testing.assert_array_equal(_values(gd, params, TOKENS, MASK), 0.0)
    with pytest.raises(ValueError, match="lm_head=False"):
        _logits(rm.graphdef, rm.params, TOKENS, MASK)


def test_bfloat16_params_and_float32_outputs():
    """bf16 parameters/compute; log-probs still float32 (the bf16 forward: test_hf.py)."""
    from flax import nnx

    cfg = make_config("llama", dtype="bfloat16", param_dtype="bfloat16")
    abstract = nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0), value_head=True))
    graphdef, params = nnx.split(abstract, nnx.Param)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    out = jax.eval_shape(
        lambda p: models.logprobs_and_values(graphdef, p, TOKENS, MASK, start=2), params
    )
    assert [o.dtype for o in out] == [jnp.float32, jnp.float32]
    assert [o.shape for o in out] == [(3, 6), (3, 6)]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(arch="gpt3"), "arch"),
        (dict(num_heads=3, num_kv_heads=2), "multiple of"),
        (dict(dtype="float16"), "dtype"),
        (dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "longrope"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(attention="flash"), "attention"),
        (dict(partial_rotary_factor=0.3), "even number of rotated dims"),
        (dict(layer_types=("full_attention",)), "layer_types"),
        (dict(num_layers=1, layer_types=("sliding_attention",)), "sliding_window"),
        (dict(arch="gpt2", mlp_bias=False), "MLP biases"),
        (dict(hidden_size=15, num_heads=4), "head_dim"),
    ],
)
def test_config_errors(kw, match):
    base = dict(arch="llama", vocab_size=V, hidden_size=16, num_heads=4)
    base.update(kw)
    with pytest.raises(ValueError, match=match):
        models.ModelConfig(**base)


def test_config_is_hashable_with_rope_scaling():
    cfg = make_config("llama")
    assert hash(cfg) == hash(make_config("llama"))
    assert dict(cfg.rope_scaling)["rope_type"] == "llama3"


def test_scan_unroll_same_numbers(model):
    """``scan_unroll`` changes how the layer loop is compiled, not what it computes: logits and
    the gradient of a log-prob loss agree with the scanned stack."""
    cfg = model.config
    unrolled = models.init_model(
        cfg.replace(scan_unroll=cfg.num_layers), jax.random.key(1), value_head=True, score_head=True
    ).graphdef

    def loss(graphdef, params):
        return models.token_logprobs(graphdef, params, TOKENS, MASK, start=2).sum()

    for fn in (
        lambda g, p: models.logits(g, p, TOKENS, MASK),
        jax.grad(loss, argnums=1),
    ):
        want = jax.jit(fn, static_argnums=0)(model.graphdef, model.params)
        got = jax.jit(fn, static_argnums=0)(unrolled, model.params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
