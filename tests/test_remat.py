"""Rematerialisation of the layer scan (``ModelConfig.remat``, ``run.remat``).

Remat changes what the backward pass keeps in memory, not what it computes: float32 gradients with
each mode equal those without (tolerance 1e-6 relative to each leaf's scale: the recomputed
forward is the same XLA:CPU arithmetic, so in practice they agree to rounding). The compiled
gradient's temporaries shrink (so the option cannot be silently ignored), and decoding, which
is never rematerialised, is bit-identical.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlhf_jax import models
from rlhf_jax.models import ModelConfig
from rlhf_jax.models.transformer import REMAT

CFG = ModelConfig(
    arch="llama", vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2
)
B, T = 2, 16


def _loss(graphdef, params, tokens):
    module = nnx.merge(graphdef, params)
    mask = jnp.ones_like(tokens)
    hidden, _ = module(tokens, models.positions_from_mask(mask), mask)
    logp = jax.nn.log_softmax(module.lm_logits(hidden[:, :-1]))
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()


def _grad(remat, params, tokens):
    """The gradient with ``remat``, and the compiled gradient's temporaries (bytes)."""
    graphdef = models.init_model(CFG.replace(remat=remat), jax.random.key(0)).graphdef
    fn = jax.jit(jax.grad(lambda p, t: _loss(graphdef, p, t)))
    compiled = fn.lower(params, tokens).compile()
    return compiled(params, tokens), compiled.memory_analysis().temp_size_in_bytes


def test_remat_same_gradients_less_memory():
    model = models.init_model(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, CFG.vocab_size)
    want, temps_none = _grad("none", model.params, tokens)
    for remat in REMAT[1:]:
        got, temps = _grad(remat, model.params, tokens)
        for (path, g), w in zip(
            jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
        ):
            scale = float(jnp.abs(w).max()) + 1e-12
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-6 * scale, err_msg=f"{remat} {path}")
        if remat == "full":  # only each layer's input kept: fewer bytes than every activation
            assert temps < temps_none, (remat, temps, temps_none)


def test_remat_is_in_the_program_and_decoding_is_unchanged():
    """remat puts a checkpoint (``remat2``) in the training forward's program, none in the cached (decoding)
    forward, whose outputs are bit-identical."""
    full = models.init_model(CFG.replace(remat="full"), jax.random.key(0))
    plain = models.init_model(CFG, jax.random.key(0))
    tokens = jnp.ones((B, T), jnp.int32)
    loss = lambda m: jax.make_jaxpr(lambda p: _loss(m.graphdef, p, tokens))(m.params)  # noqa: E731
    assert "remat" in str(loss(full))
    assert "remat" not in str(loss(plain))

    def decode(m):
        module = nnx.merge(m.graphdef, m.params)
        cache = models.init_cache(CFG, B, T)
        mask, pos = jnp.ones((B, T), jnp.int32), jnp.zeros((B, 1), jnp.int32)
        return module(tokens[:, :1], pos, mask, cache, 0)

    jaxpr = str(jax.make_jaxpr(decode)(full))
    assert "remat" not in jaxpr
    for a, b in zip(jax.tree.leaves(decode(full)), jax.tree.leaves(decode(plain)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_run_remat_reaches_the_loaded_model(tmp_path):
    """``run.remat`` rebuilds the loaded model's graphdef with the option (heads kept, the same
    parameters); an unknown value is refused."""
    from rlhf_jax import pipeline

    models.save_pretrained(models.init_model(CFG, jax.random.key(0)), str(tmp_path / "m"))
    cfg = pipeline.ExperimentConfig(run=pipeline.RunConfig(dir=str(tmp_path), remat="dots"))
    ctx = pipeline.Context(cfg=cfg, stage="sft", mesh=None)
    for heads in ({}, dict(lm_head=False, score_head=True, key=jax.random.key(2))):
        model = ctx.load_model(str(tmp_path / "m"), **heads)
        module = nnx.merge(model.graphdef, model.params)
        assert model.config.remat == module.config.remat == "dots"
        assert module.has_lm_head == ("lm_head" not in heads)
        assert module.has_score_head == ("score_head" in heads)
        base = models.from_pretrained(str(tmp_path / "m"), **heads)
        jax.tree.map(np.testing.assert_array_equal, model.params, base.params)
    with pytest.raises(ValueError, match="run.remat"):
        pipeline.RunConfig(remat="always")
    with pytest.raises(ValueError, match="ModelConfig.remat"):
        CFG.replace(remat="always")
