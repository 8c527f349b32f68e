"""User-supplied reward functions: loading, validation, decoding, and the jitted callback path."""

import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import reward_fn as rf

WORDS = ["<pad>", "<eos>", "a", "dog", "cat", "is", "furry", "."]


def make_tokenizer():
    """A word-level transformers tokenizer over WORDS (pad=0, eos=1), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """An importable module ``my_rewards`` and the same code as a file ``rewards_file.py``."""
    code = textwrap.dedent(
        """
        CALLS = []

        def count_dogs(prompts, responses):
            CALLS.append((list(prompts), list(responses)))
            return [float(r.split().count("dog")) for r in responses]

        def wrong_length(prompts, responses):
            return [0.0]

        def not_numbers(prompts, responses):
            return ["high"] * len(responses)

        def with_nan(prompts, responses):
            return [float("nan")] * len(responses)

        def raises(prompts, responses):
            raise RuntimeError("boom")

        def one_argument(responses):
            return [0.0] * len(responses)

        class Scorer:
            @staticmethod
            def length(prompts, responses):
                return [len(r) for r in responses]

        NOT_CALLABLE = 3
        """
    )
    (tmp_path / "my_rewards.py").write_text(code)
    (tmp_path / "rewards_file.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_load_module_file_and_callable(reward_module):
    fn = rf.load_reward_fn("my_rewards:count_dogs")
    assert fn([""], ["a dog dog"]) == [2.0]
    assert rf.load_reward_fn("my_rewards:Scorer.length")([""], ["abc"]) == [3]
    from_file = rf.load_reward_fn(f"{reward_module / 'rewards_file.py'}:count_dogs")
    assert from_file(["x"], ["dog"]) == [1.0]
    assert rf.load_reward_fn(len) is len


@pytest.mark.parametrize(
    "spec, match",
    [
        ("my_rewards", "write 'module:function'"),
        ("a:b:c", "write 'module:function'"),
        (":count_dogs", "must be non-empty"),
        ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'.*PYTHONPATH"),
        ("no_such_pkg_xyz.sub:f", "no module named 'no_such_pkg_xyz.sub'"),
        ("my_rewards:count_cats", "has no function 'count_cats' \\(did you mean 'count_dogs'"),
        ("my_rewards:Scorer.size", "'my_rewards:Scorer' has no function 'size'"),
        ("my_rewards:NOT_CALLABLE", "is a int, not a function"),
        ("missing_dir/missing.py:f", "does not exist.*working directory"),
        ("broken_rewards:f", "was found but importing it failed: NameError: name 'undefined_na"),
        ("syntax_error.py:f", "importing 'syntax_error.py' failed: SyntaxError"),
        ("numpy:no_such_function_xyz", "'numpy' has no function 'no_such_function_xyz'"),
    ],
)
def test_load_errors_are_one_line(reward_module, monkeypatch, spec, match):
    (reward_module / "broken_rewards.py").write_text("x = undefined_name\n")
    (reward_module / "syntax_error.py").write_text("def f(:\n")
    monkeypatch.chdir(reward_module)
    with pytest.raises(rf.RewardFunctionError, match=match) as info:
        rf.load_reward_fn(spec)
    message = str(info.value)
    assert "\n" not in message and len(message) < 400, message
    assert info.value.__cause__ is None  # no chained import traceback behind the line


@pytest.mark.parametrize(
    "name, match",
    [
        ("wrong_length", "returned 1 scores for 2 responses"),
        ("not_numbers", "every score must be a real number"),
        ("with_nan", "non-finite score nan"),
        ("raises", "raised RuntimeError: boom"),
        ("one_argument", "raised TypeError: one_argument\\(\\) takes 1 positional argument"),
    ],
)
def test_pre_flight_check_before_compiling(tokenizer, reward_module, name, match):
    import my_rewards

    prompts = ["a dog is", "a cat is"]
    reward = rf.RewardFunction.load(f"my_rewards:{name}", tokenizer)
    with pytest.raises(rf.RewardFunctionError, match=match) as info:
        reward.check(prompts)
    message = str(info.value)
    assert message.startswith(f"reward_fn 'my_rewards:{name}' failed its check on 2 samples")
    assert "first sample: prompt 'a dog is', response ''" in message
    assert "\n" not in message and len(message) < 400, message
    # A good function passes, on strings and on a prompt batch decoded as the step decodes it.
    good = rf.RewardFunction.load("my_rewards:count_dogs", tokenizer)
    my_rewards.CALLS.clear()
    np.testing.assert_array_equal(good.check(prompts, ["dog", "dog dog"]), [1.0, 2.0])
    np.testing.assert_array_equal(good.check_tokens(PROMPTS, PROMPT_MASK), [0.0, 0.0])
    assert my_rewards.CALLS[-1] == (["a dog", "cat"], ["", "cat"])


def test_check_scores():
    np.testing.assert_array_equal(rf.check_scores([1, 2.5], 2), np.array([1.0, 2.5], np.float32))
    assert rf.check_scores(np.arange(3), 3).dtype == np.float32
    with pytest.raises(rf.RewardFunctionError, match="3 scores for 2 responses"):
        rf.check_scores([1.0, 2.0, 3.0], 2)
    with pytest.raises(rf.RewardFunctionError, match="str 'x' at index 1"):
        rf.check_scores([1.0, "x"], 2)
    with pytest.raises(rf.RewardFunctionError, match="bool"):
        rf.check_scores([True, 1.0], 2)
    with pytest.raises(rf.RewardFunctionError, match="returned a float"):
        rf.check_scores(1.0, 1)
    with pytest.raises(rf.RewardFunctionError, match="shape \\(2, 1\\)"):
        rf.check_scores(np.zeros((2, 1)), 2)
    with pytest.raises(rf.RewardFunctionError, match="non-finite score inf at index 1"):
        rf.check_scores([0.0, float("inf")], 2)


# prompts left-padded [B=2, P=3]; responses right-padded [B, R=4], mask 1 through the stop token
PROMPTS = np.array([[0, 2, 3], [0, 0, 4]], np.int32)
PROMPT_MASK = np.array([[0, 1, 1], [0, 0, 1]], np.int32)
RESPONSES = np.array([[5, 3, 1, 0], [3, 3, 3, 3]], np.int32)
RESPONSE_MASK = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.int32)


def test_decode_skips_padding_and_special_tokens(tokenizer, reward_module):
    reward = rf.RewardFunction.load("my_rewards:count_dogs", tokenizer)
    prompts, responses = reward.texts(PROMPTS, PROMPT_MASK, RESPONSES, RESPONSE_MASK)
    assert prompts == ["a dog", "cat"]
    assert responses == ["is dog", "dog dog dog dog"]
    keep = rf.RewardFunction.load("my_rewards:count_dogs", tokenizer, skip_special_tokens=False)
    assert keep.texts(PROMPTS, PROMPT_MASK, RESPONSES, RESPONSE_MASK)[1][0] == "is dog <eos>"


def test_callback_inside_jit_and_vmap(tokenizer, reward_module):
    import my_rewards

    reward = rf.RewardFunction.load("my_rewards:count_dogs", tokenizer)
    my_rewards.CALLS.clear()

    @jax.jit
    def f(q, qm, r, rm):
        return rf.callback_scores(reward, q, qm, r, rm) * 2.0

    out = f(PROMPTS, PROMPT_MASK, RESPONSES, RESPONSE_MASK)
    np.testing.assert_array_equal(np.asarray(out), [2.0, 8.0])
    assert my_rewards.CALLS == [(["a dog", "cat"], ["is dog", "dog dog dog dog"])]

    # vmap over two runs: one call per run, each with its own responses
    my_rewards.CALLS.clear()
    r2 = jnp.stack([RESPONSES, jnp.where(RESPONSES == 3, 4, RESPONSES)])
    out = jax.jit(jax.vmap(f, in_axes=(None, None, 0, None)))(
        PROMPTS, PROMPT_MASK, r2, RESPONSE_MASK
    )
    np.testing.assert_array_equal(np.asarray(out), [[2.0, 8.0], [0.0, 0.0]])
    assert len(my_rewards.CALLS) == 2


@pytest.mark.parametrize(
    "name, match",
    [
        ("wrong_length", "returned 1 scores for 2 responses"),
        ("not_numbers", "every score must be a real number"),
        ("with_nan", "non-finite score nan"),
        ("raises", "raised RuntimeError: boom"),
    ],
)
def test_callback_errors_surface_from_jit(tokenizer, reward_module, name, match):
    reward = rf.RewardFunction.load(f"my_rewards:{name}", tokenizer)
    with pytest.raises(rf.RewardFunctionError, match=match):
        reward(PROMPTS, PROMPT_MASK, RESPONSES, RESPONSE_MASK)
    f = jax.jit(lambda *a: rf.callback_scores(reward, *a))
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(f(PROMPTS, PROMPT_MASK, RESPONSES, RESPONSE_MASK))
    # The one-line error behind the runtime error's traceback, to re-raise.
    err = reward.callback_error()
    assert isinstance(err, rf.RewardFunctionError) and re.search(match, str(err))
    assert "\n" not in str(err)
    good = rf.RewardFunction.load("my_rewards:count_dogs", tokenizer)
    good(PROMPTS, PROMPT_MASK, RESPONSES, RESPONSE_MASK)
    assert good.callback_error() is None
