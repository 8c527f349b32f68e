"""rlhf_jax.masks: the score slot and the policy / value masks, literal cases per convention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import masks
from rlhf_jax.presets import PRESETS, Conventions

# Responses that stop at different lengths, one with a hole, one truncated (full), one empty.
MASK = np.array(
    [
        [1, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0],
    ],
    np.int32,
)


def test_score_slot_and_masks_literal():
    last = Conventions(score_position="last_token")
    after = Conventions(score_position="after_stop")
    fixed = Conventions(score_position="last_fixed")
    np.testing.assert_array_equal(masks.last_token_index(MASK), [2, 4, 5, -1, 0])
    np.testing.assert_array_equal(np.argmax(masks.score_slot(MASK, options=last), 1)[:3], [2, 4, 5])
    np.testing.assert_array_equal(
        masks.score_slot(MASK, options=after),
        np.eye(6)[[3, 5, 5, 0, 1]] * np.array([1, 1, 1, 0, 1])[:, None],
    )
    np.testing.assert_array_equal(masks.score_slot(MASK, options=fixed), np.eye(6)[[5] * 5])
    vm = np.asarray(masks.value_mask(MASK, options=after))
    want = MASK.copy().astype(np.float32)
    want[0, 3] = want[1, 5] = want[4, 1] = 1
    np.testing.assert_array_equal(vm, want)
    np.testing.assert_array_equal(masks.value_mask(MASK, options=fixed), np.ones(MASK.shape))
    np.testing.assert_array_equal(masks.policy_mask(MASK, options=after), MASK)
    dsc = Conventions(score_position="after_stop", value_loss_on="response")
    np.testing.assert_array_equal(masks.value_loss_mask(MASK, options=dsc), MASK)
    np.testing.assert_array_equal(masks.value_loss_mask(MASK, options=after), want)


def test_last_token_score_slot_is_inside_the_response_mask():
    """``'last_token'``: the slot is the last real token, so the masks equal the response mask
    and an empty row gets no slot."""
    last = Conventions(score_position="last_token")
    slot = np.asarray(masks.score_slot(MASK, options=last))
    np.testing.assert_array_equal(slot.sum(1), [1, 1, 1, 0, 1])
    assert np.all(slot <= MASK)
    for fn in (masks.value_mask, masks.policy_mask, masks.value_loss_mask):
        np.testing.assert_array_equal(fn(MASK, options=last), MASK)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_masks_under_jit_and_vmap(preset):
    """Every mask of every preset's conventions: float32, the same eagerly, under jit and under
    vmap over a leading axis (bool and int masks alike)."""
    conv = PRESETS[preset].conventions
    fns = (masks.score_slot, masks.value_mask, masks.policy_mask, masks.value_loss_mask)
    for fn in fns:
        eager = fn(MASK, options=conv)
        assert eager.dtype == jnp.float32 and eager.shape == MASK.shape
        jitted = jax.jit(lambda m, fn=fn: fn(m, options=conv))
        np.testing.assert_array_equal(jitted(MASK.astype(bool)), eager)
        stacked = jax.vmap(lambda m, fn=fn: fn(m, options=conv))(np.stack([MASK, MASK[::-1]]))
        np.testing.assert_array_equal(stacked[0], eager)
        np.testing.assert_array_equal(stacked[1], fn(MASK[::-1], options=conv))


def test_as_float_promotes_low_precision_only():
    assert masks.as_float(jnp.ones(2, jnp.bfloat16)).dtype == jnp.float32
    assert masks.as_float(np.ones(2, np.int32)).dtype == jnp.float32
    assert masks.as_float(0.5).dtype == jnp.float32


def test_as_scalar_rejects_arrays_with_a_shape():
    assert masks.as_scalar("beta", 0.1).shape == ()
    assert jax.jit(lambda b: masks.as_scalar("beta", b))(jnp.float32(0.1)).shape == ()
    with pytest.raises(ValueError, match="beta must be a scalar"):
        masks.as_scalar("beta", jnp.ones(3))
