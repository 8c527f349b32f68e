"""The errors a user can cause, and the one way the ``rlhf-jax`` command reports them.

Every error that bad input can cause (a config, a data file, a model directory, a checkpoint, a
reward function, the file system) is a :class:`UserError`: its message says *what* is wrong,
*where* (the file, line, key or path) and *what to do*, in one line. The command prints it as::

    rlhf-jax: error: <message>

with no traceback (``--debug`` shows one) and exits with :attr:`UserError.exit_code`: 2 for a bad
command line or config, 1 for everything else. The library raises the same exceptions, so a
notebook user reads the same message.

The concrete classes live beside the code that raises them and subclass :class:`UserError` as
well as the builtin their callers may already catch (``ValueError``, ``RuntimeError``):
``config.ConfigError``, ``data.formats.DataError``, ``checkpoint.CheckpointError``,
``reward_fn.RewardFunctionError``, ``models.hf.ModelLoadError``, ``train.NonFiniteError``.
"""

from __future__ import annotations

__all__ = ["UserError", "UsageError", "first_line"]


class UserError(Exception):
    """Bad input; the message says what, where, and what to do. Exit status 1."""

    exit_code = 1


class UsageError(UserError):
    """A bad command line or config. Exit status 2."""

    exit_code = 2


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``err``'s message, cut to ``limit`` characters (for wrapping a
    library's multi-line error into one of ours)."""
    text = str(err).strip() or type(err).__name__
    line = next((x.strip() for x in text.splitlines() if x.strip()), text)
    return line if len(line) <= limit else line[: limit - 3] + "..."
