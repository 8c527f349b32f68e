"""Mixtral's mixture of experts: the router and the expert layer against float64 numpy, greedy
decoding with the KV cache against the full forward, and the ``expert`` mesh axis on 8 fake CPU
devices against one device.

Golden logits against transformers (PyTorch) are in tests/test_hf.py (the ``mixtral`` fixture).
Tolerances: 1e-6 for the routing weights (one softmax), 1e-5 for a layer and for the mesh.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, parallel, rollout
from rlhf_jax.models import transformer
from rlhf_jax.parallel import MeshConfig
from rlhf_jax.rollout import SamplingConfig

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "golden", "mixtral")
E, K, D, F = 4, 2, 16, 24


def _config(**kw):
    base = dict(
        arch="mixtral",
        vocab_size=32,
        hidden_size=D,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=F,
        max_position_embeddings=32,
        num_experts=E,
        num_experts_per_tok=K,
    )
    return models.ModelConfig(**(base | kw))


def _np_routing(logits: np.ndarray, k: int) -> np.ndarray:
    """transformers' MixtralTopKRouter in float64: softmax over the experts, the k largest kept
    and renormalised; zeros elsewhere."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.zeros_like(p)
    for idx in np.ndindex(p.shape[:-1]):
        top = np.argsort(-p[idx])[:k]
        out[idx + (top,)] = p[idx][top] / p[idx][top].sum()
    return out


def test_routing_weights_softmax_of_the_top_k():
    logits = np.asarray(jax.random.normal(jax.random.key(0), (3, 5, E)) * 2.0)
    got = np.asarray(transformer.routing_weights(_config(), jnp.asarray(logits)))
    want = _np_routing(logits, K)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    assert np.all((got > 0).sum(-1) == K) and np.allclose(got.sum(-1), 1.0)
    # the same as a softmax over the chosen logits (Mixtral's paper form)
    top = np.sort(logits, -1)[..., -K:]
    chosen = np.exp(top - top.max(-1, keepdims=True))
    np.testing.assert_allclose(
        np.sort(got, -1)[..., -K:], chosen / chosen.sum(-1, keepdims=True), atol=1e-6
    )


def test_dense_experts_equal_the_sparse_sum_of_the_chosen_ones():
    """``moe_mlp`` runs every expert on every token with zero weights for the unchosen: the result
    is a loop over each token's k chosen experts only (float64 numpy)."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=(2, 3, D)).astype(np.float32)
    w = {
        "router": {"kernel": rng.normal(size=(D, E)).astype(np.float32), "bias": None},
        "experts": {
            "gate": (0.3 * rng.normal(size=(E, D, F))).astype(np.float32),
            "up": (0.3 * rng.normal(size=(E, D, F))).astype(np.float32),
            "down": (0.3 * rng.normal(size=(E, F, D))).astype(np.float32),
        },
    }
    got = np.asarray(transformer.moe_mlp(_config(), w, jnp.asarray(y)))
    y64 = y.astype(np.float64)
    ex = {k: v.astype(np.float64) for k, v in w["experts"].items()}
    weights = _np_routing(y64 @ w["router"]["kernel"].astype(np.float64), K)
    want = np.zeros_like(y64)
    for b, t in np.ndindex(2, 3):
        x = y64[b, t]
        for e in np.flatnonzero(weights[b, t]):  # the k chosen experts only
            gate, up = x @ ex["gate"][e], x @ ex["up"][e]
            h = gate / (1 + np.exp(-gate)) * up  # SwiGLU
            want[b, t] += weights[b, t, e] * (h @ ex["down"][e])
    assert np.all((weights > 0).sum(-1) == K)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_greedy_decoding_with_the_cache_equals_the_full_forward_argmax():
    """The golden Mixtral (window 6) decodes 8 greedy tokens past its window through the rollout's
    KV cache: each is the argmax of the full forward over prompt + the tokens before it."""
    model = models.from_pretrained(GOLDEN)
    ref = dict(np.load(os.path.join(GOLDEN, "reference.npz")))
    tokens, mask = ref["tokens"], ref["attention_mask"]
    p, r = tokens.shape[1], 8
    ro = rollout.sample(
        model.graphdef,
        model.params,
        tokens,
        mask,
        jax.random.key(0),
        max_new_tokens=r,
        sampling=SamplingConfig(greedy=True),
    )
    assert np.all(np.asarray(ro.lengths) == r)
    full, full_mask = rollout.full_sequences(tokens, mask, ro)
    logits = np.asarray(
        jax.jit(models.logits, static_argnums=0)(model.graphdef, model.params, full, full_mask)
    )
    # position P-1+t predicts response token t
    np.testing.assert_array_equal(np.asarray(ro.tokens), logits[:, p - 1 : p + r - 1].argmax(-1))


@pytest.fixture(scope="module")
def one_device():
    model = models.init_model(_config(), jax.random.key(1))
    rng = np.random.default_rng(2)
    tokens = rng.integers(1, 32, (4, 8)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0  # a left-padded row
    logits = jax.jit(models.logits, static_argnums=0)(model.graphdef, model.params, tokens, mask)
    return model, tokens, mask, np.asarray(logits)


@pytest.mark.parametrize(
    "preset, mesh_cfg",
    [
        ("dp", MeshConfig(data=2, expert=4)),
        ("fsdp+tp", MeshConfig(data=1, fsdp=2, expert=2, tensor=2)),
    ],
)
def test_expert_axis_splits_the_experts_and_keeps_the_logits(one_device, preset, mesh_cfg):
    model, tokens, mask, want = one_device
    mesh = parallel.make_mesh(mesh_cfg)
    n_expert = mesh.shape["expert"]
    params = parallel.shard_params(model.params, mesh, preset)
    experts = params["layers"]["mlp"]["experts"]
    for name in ("gate_proj", "up_proj", "down_proj"):
        leaf = experts[name].get_value()
        assert leaf.sharding.spec[1] == "expert", (name, leaf.sharding.spec)
        # [L, E, ...]: each device holds E / expert of the experts
        assert leaf.addressable_shards[0].data.shape[1] == E // n_expert
        assert len({s.index[1].start for s in leaf.addressable_shards}) == n_expert
    batch = parallel.shard_batch({"tokens": tokens, "mask": mask}, mesh)
    got = jax.jit(models.logits, static_argnums=0)(
        model.graphdef, params, batch["tokens"], batch["mask"]
    )
    real = mask > 0
    np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-5, rtol=0)
