"""Datasets in the formats TRL users already have, tokenized into static-shape numpy batches.

Sources: JSON Lines (``.jsonl``; ``.json`` holding JSON lines or one JSON array), Parquet
(``.parquet``, read with pyarrow), a Hugging Face ``datasets.Dataset`` (duck-typed: the optional
``datasets`` package is never imported here), or an in-memory list of dicts.

Row kinds (``DataConfig.kind``), with TRL's field names; each text field may instead be
*conversational* (a list of ``{"role", "content"}`` messages rendered with the tokenizer's chat
template):

==============  =========================================================================
``prompt``      ``{"prompt"}`` (or ``{"messages"}``; a trailing assistant turn is dropped)
``completion``  ``{"prompt", "completion"}`` (or ``{"messages"}`` ending with an assistant turn)
``preference``  ``{"prompt", "chosen", "rejected"}`` and an optional numeric ``"margin"``
``ranking``     ``{"prompt", "completions"}``: exactly K completions ranked best to worst
``safety``      ``{"prompt", "response_0", "response_1", "better_response_id",
                "safer_response_id", "is_response_0_safe", "is_response_1_safe"}``
                (PKU-SafeRLHF): the ids are the integer 0 or 1, the flags booleans
==============  =========================================================================

Tokenization: a text prompt is encoded with the tokenizer's special tokens (its ``<bos>``), a text
completion without them, and the tokenizer's EOS is appended to a completion that does not already
end with it (``append_eos``). A conversational prompt is ``apply_chat_template(messages,
add_generation_prompt=True)``; its completion is the text the template adds when the completion's
messages are appended (the template must extend the prompt's rendering), both encoded without extra
special tokens.

Output: :func:`load_dataset` reads and validates *every* row up front, so a malformed row fails at
load time with a :class:`DataError` naming the source, the row (the line number for JSON Lines) and
the field -- or, with ``on_error="skip"``, is skipped and counted -- never inside a compiled step.
Prompts longer than ``max_prompt_length`` or completions longer than ``max_completion_length`` are
rejected, filtered out (counted) or truncated (counted; prompts keep their last tokens, completions
their first), by ``overlong``. Text that encodes to the tokenizer's unknown token is counted
(``rows_with_unknown_tokens``) or, with ``unknown_tokens="error"``, is a row error. A preference
row whose chosen and rejected completions are the same tokens (after truncation) teaches a reward
model nothing: it is a *degenerate pair*, dropped and counted by default (``degenerate_pairs``);
so is a safety row whose ``response_0`` and ``response_1`` are the same tokens.
:meth:`TokenizedDataset.summary` is one line a program prints per dataset: rows read and kept,
and every count above.
:class:`DataLoader` yields batches of numpy int32 arrays::

    index            [B]         the example's row in the tokenized dataset
    prompt_tokens    [B, P]      left-padded with the tokenizer's pad id; prompt_mask alike
    completion_tokens[B, R]      right-padded (kind "completion"); completion_mask alike
    chosen_tokens    [B, R]      right-padded (kind "preference"); chosen_mask, rejected_tokens,
                                 rejected_mask alike; margin [B] float32 when the data has margins
    response_tokens  [B, K, R]   right-padded, best first (kind "ranking"); response_mask alike
    response_tokens  [B, 2, R]   right-padded, response_0 then response_1 as in the row (kind
                                 "safety"); response_mask alike; better [B] and safer [B] (the
                                 better_response_id / safer_response_id, 0 or 1); safe [B, 2]
                                 (1 = the response is safe, 0 = unsafe)

in an order that is a function of ``(seed, epoch)`` only. Its cursor, ``{"seed", "epoch",
"position"}``, is a small JSON-able dict: a loader restored from it yields exactly the batches the
original would have yielded next. Every batch is full (the last partial batch of an epoch is
dropped), so shapes are static.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

from rlhf_jax.errors import UserError

__all__ = [
    "KINDS",
    "DataConfig",
    "DataError",
    "DataLoader",
    "LoadStats",
    "TokenizedDataset",
    "epoch_permutation",
    "load_dataset",
    "read_rows",
]

KINDS = ("prompt", "completion", "preference", "ranking", "safety")
FORMATS = ("jsonl", "json", "parquet")
ROLES = ("system", "user", "assistant", "tool")
_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet"}
_MAX_ERRORS_KEPT = 20


class DataError(UserError, ValueError):
    """A dataset problem located by ``source``, ``row`` (1-based, or None), ``field`` (or None)."""

    def __init__(
        self,
        source: str,
        message: str,
        *,
        row: int | None = None,
        field: str | None = None,
        unit: str = "row",
    ):
        self.source, self.row, self.field, self.problem = source, row, field, message
        where = source
        if row is not None:
            where += f", {unit} {row}"  # "line" in a JSON Lines file, else "row"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class _RowError(Exception):
    """Raised inside row validation; turned into a located DataError (or a skip) by the caller."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


@dataclass(frozen=True)
class DataConfig:
    """How to read, validate and tokenize a dataset."""

    kind: Literal["prompt", "completion", "preference", "ranking", "safety"]  # what a row holds
    max_prompt_length: int  # P, the static (left-padded) prompt length, special tokens included
    max_completion_length: int = 0  # R, the static (right-padded) completion length; 0 for prompts
    num_completions: int | None = None  # K, required for kind "ranking"
    overlong: Literal["error", "filter", "truncate"] = "filter"  # rows over P or R
    on_error: Literal["raise", "skip"] = "raise"  # a malformed row: stop, or skip and count it
    append_eos: bool = True  # end each completion with the tokenizer's EOS if it does not already
    vocab_size: int | None = None  # the model's vocabulary size: checked against the tokenizer
    unknown_tokens: Literal["allow", "error"] = "allow"  # text that encodes to the unk token
    # preference rows with chosen == rejected, safety rows with response_0 == response_1 (the
    # same tokens): drop and count, keep and count, or treat as a malformed row (on_error decides)
    degenerate_pairs: Literal["drop", "keep", "error"] = "drop"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"DataConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.max_prompt_length < 1:
            raise ValueError(
                f"DataConfig.max_prompt_length must be >= 1, got {self.max_prompt_length}"
            )
        if self.kind != "prompt" and self.max_completion_length < 1:
            raise ValueError(
                f"DataConfig.max_completion_length must be >= 1 for kind {self.kind!r}, "
                f"got {self.max_completion_length}"
            )
        if self.kind == "ranking" and (self.num_completions is None or self.num_completions < 2):
            raise ValueError(
                "DataConfig.num_completions (K) must be set to >= 2 for kind 'ranking', "
                f"got {self.num_completions}"
            )
        if self.overlong not in ("error", "filter", "truncate"):
            raise ValueError(
                "DataConfig.overlong must be 'error', 'filter' or 'truncate', "
                f"got {self.overlong!r}"
            )
        if self.unknown_tokens not in ("allow", "error"):
            raise ValueError(
                f"DataConfig.unknown_tokens must be 'allow' or 'error', got {self.unknown_tokens!r}"
            )
        if self.degenerate_pairs not in ("drop", "keep", "error"):
            raise ValueError(
                "DataConfig.degenerate_pairs must be 'drop', 'keep' or 'error', "
                f"got {self.degenerate_pairs!r}"
            )
        if self.on_error not in ("raise", "skip"):
            raise ValueError(
                f"DataConfig.on_error must be 'raise' or 'skip', got {self.on_error!r}"
            )


@dataclass
class LoadStats:
    """What loading did: counts of rows read, kept, skipped as malformed, filtered, truncated."""

    rows_read: int = 0
    rows_kept: int = 0
    skipped_malformed: int = 0
    filtered_overlong: int = 0
    truncated_prompts: int = 0
    truncated_completions: int = 0
    rows_with_unknown_tokens: int = 0  # kept rows whose text encodes to the tokenizer's unk token
    degenerate_pairs: int = 0  # preference/safety rows with two equal completions (see config)
    degenerate_kept: bool = False  # whether those rows were kept (DataConfig.degenerate_pairs)
    errors: list[str] = field(default_factory=list)  # the first few skipped rows' messages

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: ``'N/M rows kept; ...'`` with every count (zeros included, so a reader
        knows each was checked)."""
        degenerate = "kept" if self.degenerate_kept else "dropped"
        return (
            f"{self.rows_kept}/{self.rows_read} rows kept; {self.filtered_overlong} overlong "
            f"filtered, {self.truncated_prompts} prompts and {self.truncated_completions} "
            f"completions truncated, {self.degenerate_pairs} degenerate pairs (chosen == "
            f"rejected) {degenerate}, {self.skipped_malformed} malformed skipped, "
            f"{self.rows_with_unknown_tokens} with unknown tokens"
        )


# --------------------------------------------------------------------------------------------------
# Reading rows.
# --------------------------------------------------------------------------------------------------


def _source_name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, list):
        return "<list of rows>"
    return f"<{type(source).__module__}.{type(source).__name__}>"


def read_rows(source: Any, format: str | None = None) -> Iterator[tuple[str, int, Any]]:
    """Yield ``(unit, number, row)`` from a file, a ``datasets.Dataset`` or a list of dicts.

    Numbers are 1-based; in JSON Lines they are line numbers (unit ``"line"``; blank lines are
    skipped but counted), elsewhere row numbers (unit ``"row"``). Raises :class:`DataError` for an
    unknown format, a missing or empty file, invalid JSON or a non-UTF-8 line; a row that is not a
    JSON object is yielded as is (the caller checks).
    """
    name = _source_name(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        fmt = format or _SUFFIXES.get(os.path.splitext(path)[1].lower())
        if fmt not in FORMATS:
            raise DataError(
                name,
                f"unknown data format {fmt or os.path.splitext(path)[1] or '(no extension)'!r}; "
                f"use a .jsonl, .json or .parquet file, or pass format= one of {FORMATS}",
            )
        if not os.path.isfile(path):
            raise DataError(name, "no such file")
        yield from _read_parquet(path) if fmt == "parquet" else _read_json(path)
        return
    if format is not None:
        raise DataError(name, f"format={format!r} is only for files")
    if hasattr(source, "column_names") and not hasattr(source, "__len__"):
        raise DataError(name, "a streaming (iterable) dataset; load it without streaming=True")
    if hasattr(source, "keys") and hasattr(source, "column_names"):  # datasets.DatasetDict
        raise DataError(name, f"a DatasetDict; pick a split, e.g. ds[{next(iter(source))!r}]")
    if isinstance(source, (list, tuple)) or hasattr(source, "column_names"):
        yield from (("row", i, row) for i, row in enumerate(source, start=1))
        return
    raise DataError(
        name, "unsupported source; pass a file path, a datasets.Dataset or a list of dicts"
    )


def _read_json(path: str) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        data = f.read()
    if not data.strip():
        raise DataError(path, "the file is empty; it must hold at least one row")
    if path.endswith(".json") and data.lstrip()[:1] == b"[":
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(path, f"invalid JSON: {e.msg}", row=e.lineno, unit="line") from None
        yield from (("row", i, row) for i, row in enumerate(rows, start=1))
        return
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                path,
                f"not UTF-8 text ({e.reason} at byte {e.start}); re-encode the file as UTF-8",
                row=lineno,
                unit="line",
            ) from None
        try:
            yield "line", lineno, json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                path,
                f"invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object",
                row=lineno,
                unit="line",
            ) from None


def _read_parquet(path: str) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(path, f"cannot read as Parquet: {e}") from None
    if table.num_rows == 0:
        raise DataError(path, "the file has no rows")
    yield from (("row", i, row) for i, row in enumerate(table.to_pylist(), start=1))


# --------------------------------------------------------------------------------------------------
# Validating and tokenizing one row.
# --------------------------------------------------------------------------------------------------

Text = str | list  # plain text, or a list of messages


def _field(row: Mapping, name: str) -> Any:
    if name not in row:
        raise _RowError(name, f"missing field {name!r} (the row has {sorted(row)})")
    if row[name] is None:
        raise _RowError(name, "is null; every row needs a value here")
    return row[name]


def _check_text(value: Any, name: str, *, conversational: bool | None) -> Text:
    """A non-empty string, or a non-empty list of well-formed messages."""
    if isinstance(value, str):
        if conversational:
            raise _RowError(name, "is plain text but the prompt is conversational (messages)")
        if not value.strip():
            raise _RowError(name, "is empty")
        return value
    if isinstance(value, list):
        if conversational is False:
            raise _RowError(name, "is a list of messages but the prompt is plain text")
        if not value:
            raise _RowError(name, "is an empty list of messages")
        for i, m in enumerate(value):
            if not isinstance(m, Mapping):
                raise _RowError(f"{name}[{i}]", f"must be a message dict, got {type(m).__name__}")
            role = m.get("role")
            if role not in ROLES:
                raise _RowError(f"{name}[{i}].role", f"must be one of {ROLES}, got {role!r}")
            content = m.get("content")
            if not isinstance(content, str):
                raise _RowError(
                    f"{name}[{i}].content", f"must be a string, got {type(content).__name__}"
                )
        if not any(m["content"].strip() for m in value):
            raise _RowError(name, "has only empty message contents")
        return value
    raise _RowError(name, f"must be a string or a list of messages, got {type(value).__name__}")


def _split_messages(row: Mapping, kind: str) -> tuple[Text, list[Text]]:
    msgs = _check_text(_field(row, "messages"), "messages", conversational=True)
    last = msgs[-1]["role"]
    if kind == "prompt":
        prompt = msgs[:-1] if last == "assistant" else msgs
        if not prompt:
            raise _RowError("messages", "has no prompt turn before the assistant's message")
        return prompt, []
    if last != "assistant":
        raise _RowError(
            f"messages[{len(msgs) - 1}].role",
            f"the last message must be the assistant's completion, got {last!r}",
        )
    if len(msgs) < 2:
        raise _RowError("messages", "needs a prompt message before the assistant's completion")
    return msgs[:-1], [[msgs[-1]]]


SAFETY_IDS = ("better_response_id", "safer_response_id")
SAFETY_FLAGS = ("is_response_0_safe", "is_response_1_safe")


def _response_id(row: Mapping, name: str) -> int:
    """The integer 0 or 1 (a Python or numpy int; not a bool, not a float)."""
    value = _field(row, name)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise _RowError(name, f"must be the integer 0 or 1, got {type(value).__name__} {value!r}")
    if value not in (0, 1):
        raise _RowError(name, f"must be the integer 0 or 1, got {int(value)}")
    return int(value)


def _safe_flag(row: Mapping, name: str) -> int:
    """A boolean (Python or numpy) as 1 (safe) or 0 (unsafe)."""
    value = _field(row, name)
    if not isinstance(value, (bool, np.bool_)):
        raise _RowError(
            name,
            f"must be a boolean, got {type(value).__name__} {value!r}; use true/false",
        )
    return int(bool(value))


def parse_row(row: Any, config: DataConfig) -> tuple[Text, list[Text], dict[str, Any]]:
    """Validate a row: ``(prompt, completions, labels)``; raises _RowError naming the field.

    ``labels`` is ``{}``, except ``{"margin": float}`` for a preference row with a margin and
    ``{"better": int, "safer": int, "safe": (int, int)}`` for a safety row (ids 0 or 1; safe 1, 0
    unsafe).
    """
    if not isinstance(row, Mapping):
        raise _RowError(None, f"a row must be a JSON object, got {type(row).__name__}")
    kind = config.kind
    if "prompt" not in row and "messages" in row and kind in ("prompt", "completion"):
        prompt, completions = _split_messages(row, kind)
        return prompt, completions, {}
    prompt = _check_text(_field(row, "prompt"), "prompt", conversational=None)
    conv = isinstance(prompt, list)
    labels: dict[str, Any] = {}
    if kind == "prompt":
        completions = []
    elif kind == "completion":
        completions = [_check_text(_field(row, "completion"), "completion", conversational=conv)]
    elif kind == "preference":
        completions = [
            _check_text(_field(row, name), name, conversational=conv)
            for name in ("chosen", "rejected")
        ]
        if row.get("margin") is not None:
            margin = row["margin"]
            if isinstance(margin, bool) or not isinstance(margin, numbers.Real):
                raise _RowError("margin", f"must be a number, got {type(margin).__name__}")
            if not math.isfinite(margin):
                raise _RowError("margin", f"must be finite, got {margin}")
            labels["margin"] = float(margin)
    elif kind == "safety":
        completions = [
            _check_text(_field(row, name), name, conversational=conv)
            for name in ("response_0", "response_1")
        ]
        better, safer = (_response_id(row, name) for name in SAFETY_IDS)
        labels = {
            "better": better,
            "safer": safer,
            "safe": tuple(_safe_flag(row, name) for name in SAFETY_FLAGS),
        }
    else:
        values = _field(row, "completions")
        if not isinstance(values, list):
            raise _RowError(
                "completions", f"must be a list ranked best to worst, got {type(values).__name__}"
            )
        if len(values) != config.num_completions:
            raise _RowError(
                "completions",
                f"has {len(values)} completions but num_completions (K) is "
                f"{config.num_completions}; every ranking needs exactly K",
            )
        completions = [
            _check_text(v, f"completions[{i}]", conversational=conv) for i, v in enumerate(values)
        ]
    if conv:
        for i, c in enumerate(completions):
            if any(m["role"] != "assistant" for m in c):
                raise _RowError(
                    _completion_field(kind, i), "completion messages must have role 'assistant'"
                )
    return prompt, completions, labels


def _completion_field(kind: str, i: int) -> str:
    return {
        "completion": "completion",
        "preference": ("chosen", "rejected")[min(i, 1)],
        "safety": ("response_0", "response_1")[min(i, 1)],
    }.get(kind, f"completions[{i}]")


class _Encoder:
    """Prompt and completion text -> token ids with the conventions of the module docstring."""

    def __init__(self, tokenizer, config: DataConfig, source: str):
        self.tok, self.config = tokenizer, config
        if tokenizer.pad_token_id is None:
            raise DataError(source, "the tokenizer has no pad token; set tokenizer.pad_token")
        if config.vocab_size is not None and len(tokenizer) > config.vocab_size:
            raise DataError(
                source,
                f"tokenizer/model vocabulary mismatch: the tokenizer has {len(tokenizer)} tokens "
                f"but the model's vocab_size is {config.vocab_size}, so some token ids would be "
                "out of range; use the tokenizer saved with the model checkpoint",
            )
        self.eos = tokenizer.eos_token_id
        self.unk = tokenizer.unk_token_id
        self.saw_unknown = False  # set when a row's text encodes to the unk token

    def _template(self, messages: list, field: str, **kwargs) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise _RowError(
                field,
                "is conversational (messages) but the tokenizer has no chat template; "
                "set tokenizer.chat_template or use plain-text fields",
            )
        return self.tok.apply_chat_template(messages, tokenize=False, **kwargs)

    def ids(self, text: str, *, special: bool) -> list[int]:
        ids = list(self.tok(text, add_special_tokens=special)["input_ids"])
        limit = self.config.vocab_size
        if limit is not None and any(i >= limit or i < 0 for i in ids):
            raise _RowError(None, f"token id out of the model's vocabulary (size {limit})")
        if self.unk is not None and self.unk in ids:
            if self.config.unknown_tokens == "error":
                words = [
                    w
                    for w in text.split()
                    if self.unk in self.tok(w, add_special_tokens=False)["input_ids"]
                ]
                raise _RowError(
                    None,
                    f"{text!r} has text the tokenizer does not know ({words[:5]} encode to "
                    f"{self.tok.unk_token!r}); fix the text or set unknown_tokens='allow'",
                )
            self.saw_unknown = True
        return ids

    def prompt(self, prompt: Text) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            return self.ids(prompt, special=True), None
        rendered = self._template(prompt, "prompt", add_generation_prompt=True)
        return self.ids(rendered, special=False), rendered

    def completion(self, prompt: Text, rendered: str | None, completion: Text, field: str):
        if isinstance(completion, str):
            ids = self.ids(completion, special=False)
        else:
            full = self._template([*prompt, *completion], field)
            if not full.startswith(rendered):
                raise _RowError(
                    field,
                    "the chat template's rendering of prompt + completion does not start "
                    "with its rendering of the prompt, so the completion cannot be separated",
                )
            ids = self.ids(full[len(rendered) :], special=False)
        if not ids:
            raise _RowError(field, "encodes to no tokens")
        if self.config.append_eos and self.eos is not None and ids[-1] != self.eos:
            ids.append(self.eos)
        return ids


# --------------------------------------------------------------------------------------------------
# The tokenized dataset.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedDataset:
    """A validated, tokenized dataset: int32 arrays with a leading example axis ``[N, ...]``.

    ``arrays`` holds the batch keys of the module docstring (without ``index``); ``stats`` says
    what loading did; ``source`` names where the rows came from.
    """

    kind: str
    arrays: dict[str, np.ndarray]
    stats: LoadStats
    source: str

    def __len__(self) -> int:
        return int(self.arrays["prompt_tokens"].shape[0])

    def summary(self) -> str:
        """The one line to print per loaded dataset: ``'<source> (<kind>): <stats>'``."""
        return f"{self.source} ({self.kind}): {self.stats.summary()}"

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at ``indices`` as one batch (with their ``index``)."""
        indices = np.asarray(indices, dtype=np.int64)
        batch = {k: v[indices] for k, v in self.arrays.items()}
        batch["index"] = indices.astype(np.int32)
        return batch


def _fit(ids: list[int], limit: int, keep: str) -> list[int]:
    return ids[-limit:] if keep == "last" else ids[:limit]


def load_dataset(
    source: Any, tokenizer, config: DataConfig, *, format: str | None = None
) -> TokenizedDataset:
    """Read, validate and tokenize every row of ``source`` (see the module docstring).

    Raises :class:`DataError` naming the source, the row and the field for the first malformed row
    (``on_error="raise"``) or the first overlong one (``overlong="error"``); when every row was
    skipped or filtered; for an empty or unreadable file, an unknown format, or a tokenizer whose
    vocabulary is larger than the model's.
    """
    name = _source_name(source)
    enc = _Encoder(tokenizer, config, name)
    P, R = config.max_prompt_length, config.max_completion_length
    stats = LoadStats(degenerate_kept=config.degenerate_pairs == "keep")
    prompts: list[list[int]] = []
    completions: list[list[list[int]]] = []
    margins: list[float | None] = []
    labels: list[dict[str, Any]] = []
    for unit, rownum, row in read_rows(source, format):
        stats.rows_read += 1
        enc.saw_unknown = False
        try:
            prompt, texts, row_labels = parse_row(row, config)
            margin = row_labels.get("margin")
            try:
                p_ids, rendered = enc.prompt(prompt)
            except _RowError as e:
                raise _RowError(e.field or "prompt", e.message) from None
            c_ids = []
            for i, text in enumerate(texts):
                fname = _completion_field(config.kind, i) if "prompt" in row else "messages"
                try:
                    c_ids.append(enc.completion(prompt, rendered, text, fname))
                except _RowError as e:
                    raise _RowError(e.field or fname, e.message) from None
            if len(p_ids) > P or any(len(c) > R for c in c_ids):
                if config.overlong == "error":
                    if len(p_ids) > P:
                        raise _RowError(
                            "prompt",
                            f"has {len(p_ids)} tokens, more than max_prompt_length={P}; raise "
                            "the limit or set overlong='filter' or 'truncate'",
                        )
                    i = next(i for i, c in enumerate(c_ids) if len(c) > R)
                    raise _RowError(
                        _completion_field(config.kind, i),
                        f"has {len(c_ids[i])} tokens, more than max_completion_length={R}; raise "
                        "the limit or set overlong='filter' or 'truncate'",
                    )
                if config.overlong == "filter":
                    stats.filtered_overlong += 1
                    continue
                if len(p_ids) > P:
                    stats.truncated_prompts += 1
                    p_ids = _fit(p_ids, P, "last")
                if any(len(c) > R for c in c_ids):
                    stats.truncated_completions += 1
                    c_ids = [_fit(c, R, "first") for c in c_ids]
            degenerate = config.kind in ("preference", "safety") and c_ids[0] == c_ids[1]
            if degenerate and config.degenerate_pairs == "error":
                first, second = (_completion_field(config.kind, i) for i in (0, 1))
                raise _RowError(
                    second,
                    f"is the same as {first!r} (after tokenization), so the pair teaches "
                    "nothing; fix the row or set degenerate_pairs='drop'",
                )
            if margin is None and margins and margins[0] is not None:
                raise _RowError("margin", "is missing but earlier rows have margins")
            if margin is not None and margins and margins[0] is None:
                raise _RowError("margin", "is set but earlier rows have none; give every row one")
        except _RowError as e:
            err = DataError(name, e.message, row=rownum, field=e.field, unit=unit)
            if config.on_error == "raise":
                raise err from None
            stats.skipped_malformed += 1
            if len(stats.errors) < _MAX_ERRORS_KEPT:
                stats.errors.append(str(err))
            continue
        if degenerate:
            stats.degenerate_pairs += 1
            if config.degenerate_pairs == "drop":
                continue
        stats.rows_with_unknown_tokens += enc.saw_unknown
        prompts.append(p_ids)
        completions.append(c_ids)
        margins.append(margin)
        labels.append(row_labels)
    if stats.rows_read == 0:
        raise DataError(name, "has no rows")
    if not prompts:
        first = f"; the first skipped: {stats.errors[0][len(name) + 2 :]}" if stats.errors else ""
        raise DataError(name, f"no usable rows ({stats.summary()}){first}")
    stats.rows_kept = len(prompts)
    pad = int(tokenizer.pad_token_id)
    arrays = _pad_prompts(prompts, P, pad)
    if config.kind == "completion":
        arrays |= _pad_completions([c[0] for c in completions], R, pad, "completion")
    elif config.kind == "preference":
        arrays |= _pad_completions([c[0] for c in completions], R, pad, "chosen")
        arrays |= _pad_completions([c[1] for c in completions], R, pad, "rejected")
        if margins[0] is not None:
            arrays["margin"] = np.asarray(margins, dtype=np.float32)
    elif config.kind in ("ranking", "safety"):
        k = 2 if config.kind == "safety" else config.num_completions
        flat = _pad_completions([c for cs in completions for c in cs], R, pad, "response")
        arrays |= {key: v.reshape(len(prompts), k, R) for key, v in flat.items()}
    if config.kind == "safety":
        arrays["better"] = np.asarray([lab["better"] for lab in labels], dtype=np.int32)
        arrays["safer"] = np.asarray([lab["safer"] for lab in labels], dtype=np.int32)
        arrays["safe"] = np.asarray([lab["safe"] for lab in labels], dtype=np.int32).reshape(-1, 2)
    return TokenizedDataset(config.kind, arrays, stats, name)


def _pad_prompts(seqs: Sequence[Sequence[int]], length: int, pad: int) -> dict[str, np.ndarray]:
    tokens = np.full((len(seqs), length), pad, dtype=np.int32)
    mask = np.zeros((len(seqs), length), dtype=np.int32)
    for i, s in enumerate(seqs):
        if s:
            tokens[i, length - len(s) :] = s
            mask[i, length - len(s) :] = 1
    return {"prompt_tokens": tokens, "prompt_mask": mask}


def _pad_completions(
    seqs: Sequence[Sequence[int]], length: int, pad: int, name: str
) -> dict[str, np.ndarray]:
    tokens = np.full((len(seqs), length), pad, dtype=np.int32)
    mask = np.zeros((len(seqs), length), dtype=np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return {f"{name}_tokens": tokens, f"{name}_mask": mask}


# --------------------------------------------------------------------------------------------------
# Shuffling, batching, the resumable cursor.
# --------------------------------------------------------------------------------------------------


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: a permutation of ``range(n)``, a function of (seed, epoch)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)


class DataLoader:
    """Full batches in a seeded order, forever (or for ``num_epochs``), with a resumable cursor.

    Epoch ``e`` visits the examples in ``epoch_permutation(len(dataset), seed, e)``, in
    consecutive chunks of ``batch_size``; a final chunk smaller than ``batch_size`` is dropped.
    ``cursor`` is ``{"seed", "epoch", "position"}`` (position: examples of the epoch already
    yielded); ``DataLoader(dataset, batch_size, cursor=saved)`` continues exactly where the saved
    loader stood.
    """

    def __init__(
        self,
        dataset: TokenizedDataset,
        batch_size: int,
        *,
        seed: int = 0,
        cursor: Mapping[str, int] | None = None,
        num_epochs: int | None = None,
    ):
        n = len(dataset)
        if batch_size < 1 or batch_size > n:
            raise ValueError(
                f"batch_size must be between 1 and the dataset size {n} ({dataset.source}), "
                f"got {batch_size}"
            )
        self.dataset, self.batch_size, self.num_epochs = dataset, batch_size, num_epochs
        self.seed, self.epoch, self.position = seed, 0, 0
        if cursor is not None:
            missing = {"seed", "epoch", "position"} - set(cursor)
            if missing:
                raise ValueError(f"data cursor {dict(cursor)} lacks {sorted(missing)}")
            self.seed, self.epoch, self.position = (
                int(cursor["seed"]),
                int(cursor["epoch"]),
                int(cursor["position"]),
            )
            if self.position < 0 or self.position > n or self.epoch < 0:
                raise ValueError(f"data cursor {dict(cursor)} does not fit a dataset of {n} rows")
        self._order = epoch_permutation(n, self.seed, self.epoch)

    @property
    def cursor(self) -> dict[str, int]:
        """Where the next batch starts: a JSON-able dict to store in a checkpoint."""
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    @property
    def batches_per_epoch(self) -> int:
        return len(self.dataset) // self.batch_size

    def __iter__(self) -> DataLoader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position + self.batch_size > len(self.dataset):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = epoch_permutation(len(self.dataset), self.seed, self.epoch)
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        idx = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.dataset.take(idx)
