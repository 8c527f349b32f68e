"""User-supplied Python reward functions, used in place of a learned reward model.

A rule-based reward ("did the response end with a period", "how many times does it say dog",
"does the code compile") is a plain Python function of strings::

    # my_rewards.py
    def count_dogs(prompts: list[str], responses: list[str]) -> list[float]:
        return [float(r.split().count("dog")) for r in responses]

and is named in a config by ``"module:function"`` (an importable module, e.g.
``"my_rewards:count_dogs"``) or ``"path/to/file.py:function"`` (a file, imported by path). PPO calls
it instead of the reward model's score head (``PPOConfig.reward_fn``).

How it runs inside a compiled step. The PPO iteration is one ``jax.jit`` function; a Python reward
function cannot be traced, so :func:`callback_scores` calls it through ``jax.pure_callback``: the
response tokens (and the prompt tokens) go to the host, are decoded with the tokenizer, the function
is called, and its scores come back as a ``[B]`` float32 array. **This path has exactly one host
round trip per iteration** (the learned reward model has none). Under ``jax.vmap`` over runs the
callback is called once per run (``vmap_method="sequential"``). With a sharded batch the callback
receives the whole (gathered) batch.

Decoding. Prompts are left-padded and responses right-padded (``docs/internals.md``); only the
positions whose mask is 1 are decoded, so padding never reaches the function. The response mask
includes the stop token; ``skip_special_tokens=True`` (the default) removes it and other special
tokens from the text, as TRL's online trainers do before calling a reward function.

Validation (:class:`RewardFunctionError`, a ``ValueError``, with a one-line message that says
what to fix): a malformed spec, a module or file that does not exist or fails to import, a missing
or non-callable attribute, a return value that is not a sequence of real numbers, has the wrong
length, or holds NaN/inf.

Pre-flight. A function that raises or returns bad scores would otherwise fail only inside the
first compiled PPO iteration, after compiling. :meth:`RewardFunction.check` (strings) or
:meth:`RewardFunction.check_tokens` (the prompt batch the run will use) calls it once on a few
decoded samples, before anything is compiled or written, and raises one
:class:`RewardFunctionError`. An error raised later inside the callback surfaces from the jitted
step as a JAX runtime error; :meth:`RewardFunction.callback_error` returns the original
:class:`RewardFunctionError`, to re-raise it as one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import numbers
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.errors import UserError, first_line

__all__ = [
    "RewardFunctionError",
    "RewardFunction",
    "load_reward_fn",
    "check_scores",
    "decode_masked",
    "callback_scores",
]

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


class RewardFunctionError(UserError, ValueError):
    """A reward-function spec cannot be loaded, or the function returned unusable scores."""


def load_reward_fn(spec: str | Callable[..., Any]) -> Callable[..., Any]:
    """Resolve ``"module:function"`` or ``"path/to/file.py:function"`` to a callable.

    Args:
      spec: ``"package.module:function"`` (imported with ``importlib``; dotted attribute paths such
        as ``"mod:Class.method"`` work), ``"some/file.py:function"`` (imported from that file), or
        a callable, returned unchanged.

    Returns:
      The callable. It is not called here; :func:`check_scores` validates what it returns.

    Raises:
      RewardFunctionError: the spec is malformed, the module or file cannot be imported, or the
        attribute is missing or not callable.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise RewardFunctionError(
            f"reward_fn={spec!r}: write 'module:function' (e.g. 'my_rewards:count_dogs') or "
            "'path/to/file.py:function'"
        )
    module_name, attr_path = (part.strip() for part in spec.split(":"))
    if not module_name or not attr_path:
        raise RewardFunctionError(
            f"reward_fn={spec!r}: both the module and the function name must be non-empty"
        )
    if module_name.endswith(".py"):
        module = _import_file(spec, module_name)
    else:
        module = _import_module(spec, module_name)
    obj: Any = module
    for i, name in enumerate(attr_path.split(".")):
        if not hasattr(obj, name):
            where = module_name if i == 0 else f"{module_name}:{'.'.join(attr_path.split('.')[:i])}"
            raise RewardFunctionError(
                f"reward_fn={spec!r}: {where!r} has no function {name!r}{_suggest(obj, name)}; "
                "write 'module:function' or 'path/to/file.py:function'"
            )
        obj = getattr(obj, name)
    if not callable(obj):
        raise RewardFunctionError(
            f"reward_fn={spec!r}: {attr_path!r} is a {type(obj).__name__}, not a function"
        )
    return obj


def _suggest(obj: Any, name: str) -> str:
    """' (did you mean ...?)' from the public callables of ``obj``, or '' (never the whole list)."""
    names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if close:
        return f" (did you mean {', '.join(repr(c) for c in close)}?)"
    if 0 < len(names) <= 8:
        return f" (it defines {', '.join(repr(c) for c in sorted(names))})"
    return ""


def _import_module(spec: str, module_name: str) -> Any:
    """Import ``module_name``; a missing module and a module whose import fails are told apart."""
    try:
        found = importlib.util.find_spec(module_name) is not None
    except (ImportError, ValueError):  # a parent package is missing, or a malformed name
        found = False
    if not found:
        raise RewardFunctionError(
            f"reward_fn={spec!r}: no module named {module_name!r} (searched sys.path: the working "
            "directory and PYTHONPATH); install it, add its directory to PYTHONPATH, or give a "
            "file as 'path/to/file.py:function'"
        )
    try:
        return importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise RewardFunctionError(
            f"reward_fn={spec!r}: module {module_name!r} was found but importing it failed: "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from None


def _import_file(spec: str, path: str) -> Any:
    """Import a Python file by path as a uniquely named module."""
    if not os.path.isfile(path):
        raise RewardFunctionError(
            f"reward_fn={spec!r}: file {path!r} does not exist (a relative path is read from the "
            f"working directory, {os.getcwd()})"
        )
    name = "_rlhf_jax_reward_fn_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise RewardFunctionError(f"reward_fn={spec!r}: cannot import {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise RewardFunctionError(
            f"reward_fn={spec!r}: importing {path!r} failed: {type(exc).__name__}: "
            f"{first_line(exc)}"
        ) from None
    return module


def check_scores(scores: Any, n: int, name: str = "reward_fn") -> np.ndarray:
    """Validate a reward function's return value and convert it to a ``[n]`` float32 array.

    Args:
      scores: what the function returned; must be a list, tuple or 1-D array of ``n`` real numbers
        (Python or NumPy ints/floats; bools and strings are rejected).
      n: the number of (prompt, response) pairs passed in.
      name: how to name the function in error messages.

    Returns:
      ``np.ndarray`` of shape ``[n]``, dtype float32.

    Raises:
      RewardFunctionError: wrong type, wrong length, a non-number entry, or a NaN/inf score.
    """
    if isinstance(scores, np.ndarray) or hasattr(scores, "__array__"):
        arr = np.asarray(scores)
        if arr.ndim != 1 or not (
            np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
        ):
            raise RewardFunctionError(
                f"{name} returned an array of shape {arr.shape} and dtype {arr.dtype}; "
                f"return {n} real numbers, one per response"
            )
        values = arr.astype(np.float64)
    elif isinstance(scores, (list, tuple)):
        for i, s in enumerate(scores):
            if isinstance(s, bool) or not isinstance(s, numbers.Real):
                raise RewardFunctionError(
                    f"{name} returned {type(s).__name__} {s!r} at index {i}; every score must "
                    "be a real number (int or float)"
                )
        values = np.asarray([float(s) for s in scores], np.float64)
    else:
        raise RewardFunctionError(
            f"{name} returned a {type(scores).__name__}; return a list of {n} floats, one per "
            "response"
        )
    if values.shape[0] != n:
        raise RewardFunctionError(
            f"{name} returned {values.shape[0]} scores for {n} responses; return one per response"
        )
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise RewardFunctionError(
            f"{name} returned a non-finite score {values[bad[0]]} at index {int(bad[0])} "
            f"({bad.size} of {n} non-finite); scores must be finite"
        )
    return values.astype(np.float32)


def decode_masked(tokenizer: Any, tokens: np.ndarray, mask: np.ndarray, **decode_kwargs) -> list:
    """Decode each row's tokens where ``mask == 1`` (padding never reaches the text).

    Args:
      tokenizer: a ``transformers`` tokenizer (anything with ``batch_decode``).
      tokens: ``[B, T]`` int token ids.
      mask: ``[B, T]`` 0/1 (or bool) mask.
      **decode_kwargs: passed to ``batch_decode`` (e.g. ``skip_special_tokens``).

    Returns:
      ``B`` strings.
    """
    tokens = np.asarray(tokens)
    keep = np.asarray(mask).astype(bool)
    rows = [row[m].tolist() for row, m in zip(tokens, keep, strict=True)]
    return list(tokenizer.batch_decode(rows, **decode_kwargs))


@dataclasses.dataclass(frozen=True, eq=False)
class RewardFunction:
    """A loaded reward function plus the tokenizer that turns token ids into its strings.

    Call it on the host with token arrays (it decodes, calls, validates); pass it to
    :func:`callback_scores` to call it from inside a jitted function.
    """

    fn: Callable[..., Any]  # (prompts: list[str], responses: list[str]) -> n real scores
    tokenizer: Any  # transformers tokenizer used to decode prompts and responses
    name: str = "reward_fn"  # how errors name the function (the spec string when loaded)
    skip_special_tokens: bool = True  # drop special tokens (stop/EOS, pad) from the decoded text
    # the RewardFunctionError the last host call raised (see callback_error); not a setting
    _errors: list = dataclasses.field(default_factory=list, repr=False, compare=False)

    @classmethod
    def load(cls, spec: str | Callable[..., Any], tokenizer: Any, **kwargs) -> RewardFunction:
        """:func:`load_reward_fn` then wrap; ``kwargs`` are the other fields."""
        name = spec if isinstance(spec, str) else getattr(spec, "__name__", "reward_fn")
        return cls(fn=load_reward_fn(spec), tokenizer=tokenizer, name=name, **kwargs)

    def texts(self, prompt_tokens, prompt_mask, response_tokens, response_mask):
        """The decoded ``(prompts, responses)`` string lists the function receives."""
        kw = {"skip_special_tokens": self.skip_special_tokens}
        prompts = decode_masked(self.tokenizer, prompt_tokens, prompt_mask, **kw)
        responses = decode_masked(self.tokenizer, response_tokens, response_mask, **kw)
        return prompts, responses

    def __call__(self, prompt_tokens, prompt_mask, response_tokens, response_mask) -> np.ndarray:
        """Host-side scores ``[B]`` float32 for token arrays ``[B, P]``, ``[B, P]``, ``[B, R]``."""
        self._errors.clear()
        try:
            prompts, responses = self.texts(
                prompt_tokens, prompt_mask, response_tokens, response_mask
            )
            return self._scores(prompts, responses)
        except RewardFunctionError as err:
            self._errors.append(err)
            raise

    def _scores(self, prompts: list[str], responses: list[str]) -> np.ndarray:
        try:
            out = self.fn(prompts, responses)
        except RewardFunctionError:
            raise
        except Exception as exc:  # noqa: BLE001 - the user's function failed
            raise RewardFunctionError(
                f"{self.name} raised {type(exc).__name__}: {first_line(exc)}"
            ) from exc
        return check_scores(out, len(responses), self.name)

    def check(
        self, prompts: Sequence[str], responses: Sequence[str] | None = None, *, n: int = 4
    ) -> np.ndarray:
        """Pre-flight: call the function once on a few samples, before anything is compiled.

        Args:
          prompts: decoded prompts (e.g. the first rows of the run's prompt data); the first
            ``n`` are used.
          responses: as many responses; default: an empty one (what a policy that stops at once
            produces) and then the prompts' own text (strings of the model's vocabulary).
          n: how many samples.

        Returns:
          The ``[k]`` float32 scores, ``k = min(n, len(prompts))``.

        Raises:
          RewardFunctionError: one line: the function raised (its exception's first line), or
            returned the wrong number of scores, non-numbers, NaN or inf.
        """
        prompts = [str(p) for p in list(prompts)[: max(1, n)]]
        if not prompts:
            raise ValueError("RewardFunction.check needs at least one prompt")
        if responses is None:
            responses = ["", *prompts[1:]]
        responses = [str(r) for r in list(responses)[: len(prompts)]]
        if len(responses) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        try:
            return self._scores(prompts, responses)
        except RewardFunctionError as err:
            raise RewardFunctionError(
                f"reward_fn {self.name!r} failed its check on {len(prompts)} samples, before "
                f"training: {_after_name(str(err), self.name)}; it must take (prompts: list[str], "
                "responses: list[str]) and return one finite float per response (first sample: "
                f"prompt {_short(prompts[0])}, response {_short(responses[0])})"
            ) from None

    def check_tokens(self, prompt_tokens, prompt_mask, *, n: int = 4) -> np.ndarray:
        """:meth:`check` on the first ``n`` rows of a prompt batch (``[B, P]`` token ids and
        mask), decoded exactly as the compiled step will decode them."""
        kw = {"skip_special_tokens": self.skip_special_tokens}
        rows = slice(0, max(1, n))
        prompts = decode_masked(
            self.tokenizer, np.asarray(prompt_tokens)[rows], np.asarray(prompt_mask)[rows], **kw
        )
        return self.check(prompts, n=n)

    def callback_error(self) -> RewardFunctionError | None:
        """The :class:`RewardFunctionError` the last host call raised, or None.

        An error raised inside :func:`callback_scores` reaches the caller of the compiled step as
        a ``jax.errors.JaxRuntimeError`` whose text holds a traceback; re-raise this instead::

            except jax.errors.JaxRuntimeError:
                if (err := reward.callback_error()) is not None:
                    raise err from None
                raise
        """
        return self._errors[-1] if self._errors else None


def _after_name(message: str, name: str) -> str:
    """'returned 1 scores for 2 responses; ...' from check_scores' 'NAME returned ...'."""
    return message[len(name) + 1 :] if message.startswith(name + " ") else message


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def callback_scores(
    reward: RewardFunction,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    response_tokens: jax.Array,
    response_mask: jax.Array,
) -> jax.Array:
    """Scores ``[B]`` float32 from a Python reward function, callable inside ``jax.jit``.

    One ``jax.pure_callback`` (one host round trip). The result has no gradient (scores are
    constants to PPO, as a reward model's are). Under ``jax.vmap`` it is called once per mapped
    element.

    Args:
      reward: the loaded :class:`RewardFunction`.
      prompt_tokens: ``[B, P]`` int32, left-padded.
      prompt_mask: ``[B, P]`` 0/1.
      response_tokens: ``[B, R]`` int32, right-padded.
      response_mask: ``[B, R]`` 0/1, 1 through the stop token.
    """
    batch = response_tokens.shape[0]
    if prompt_tokens.shape[0] != batch:
        raise ValueError(
            f"prompt batch {prompt_tokens.shape[0]} != response batch {batch}; repeat each prompt "
            "once per sample before scoring"
        )
    out = jax.ShapeDtypeStruct((batch,), jnp.float32)
    scores = jax.pure_callback(
        reward,
        out,
        prompt_tokens,
        prompt_mask,
        response_tokens,
        response_mask,
        vmap_method="sequential",
    )
    return jax.lax.stop_gradient(scores)
