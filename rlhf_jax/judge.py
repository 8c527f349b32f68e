"""An LM judge: pairwise preferences and pointwise scores read from a causal LM's logits.

RLAIF replaces the human labeller with a model (Bai et al. 2022, *Constitutional AI*; Lee et al.
2023, *RLAIF vs. RLHF*). Here the judge is one more frozen parameter pytree: any causal LM the
project loads (a Hugging Face directory or a run's policy), placed on the mesh by the same sharding
rules as the reward model, and read by pure, jittable functions, so its judgement can be compiled
into a step with no host round trip.

**The template is data.** A text (``JudgeConfig.template`` or ``template_file``) with slots::

    {principles}   the constitution / guidelines (JudgeConfig.principles or principles_file)
    {prompt}       the prompt (optional)
    {response_a}, {response_b}   pairwise mode: the two responses (required, once each)
    {response}     pointwise mode: the response (required, once)

When the judge's tokenizer has a chat template (and ``use_chat_template``), the filled text is the
user message, rendered with ``add_generation_prompt=True``: the next token is the assistant's
answer. Otherwise the text is used as is, after the tokenizer's own leading special tokens (a
``<bos>``). The rendering is split at the slots into ``len(slots) + 1`` constant token pieces
(:class:`Template`); a batch's judge input is ``piece_0, slot_1, piece_1, ..., piece_n`` with each
slot's own mask, so left-padded prompts and right-padded responses leave *holes* (mask 0) in the
sequence, which the model skips: positions come from ``cumsum(mask)`` and attention from the mask,
so a row with holes gives the logits of the packed row (``tests/test_judge.py``). Each piece is
tokenized on its own, as the slot contents are: put whitespace or a newline around the slots of a
BPE tokenizer's template so that no token would cross a slot boundary.

**Reading the judgement** (the logits at the last real position, the next token):

- *Pairwise*: with ``(a_A, a_B)`` the answer tokens' logits renormalised over the two,
  ``p_AB = softmax(a)_A`` with ``(x, y)`` shown in that order and ``p_BA = softmax(a)_B`` with the
  order swapped; ``P(x > y) = (p_AB + p_BA) / 2``. Averaging over both orders removes the judge's
  position bias (Lee et al. 2023, §3.1; Zheng et al. 2023 report the bias): a judge that always
  answers "A" gives 0.5. ``consistency`` says whether both orders pick the same response.
- *Pointwise*: ``E[s] = sum_k softmax(l_{s_k}) v_k`` over the score tokens ``s_k`` ("1".."10",
  values ``v_k`` their numbers), renormalised over the score tokens (the G-Eval expectation, Liu et
  al. 2023).

Public API::

    JudgeConfig                 the judge: model, template, principles, answers, score tokens
    load_judge(cfg, ...) -> Judge   (host: text in, numpy out, chunked and placed on the mesh)
    Template, build_template(tokenizer, cfg, ...) -> Template    (checked: UserError on bad input)
    render(cfg, tokenizer, values) -> str                         (the text the judge reads)
    judge_preferences(graphdef, params, template, prompt_tokens, prompt_mask,
                      a_tokens, a_mask, b_tokens, b_mask) -> [B] P(a > b)       (pure, jittable)
    pairwise_judgement(...) -> {"preference", "first", "second", "answer_mass", "consistent"}
    judge_scores(graphdef, params, template, prompt_tokens, prompt_mask,
                 response_tokens, response_mask) -> [B] expected score        (pure, jittable)
    rank_from_preferences(p [N, K, K]) -> best-first orders (Copeland / Borda on P)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from rlhf_jax.config import ConfigError
from rlhf_jax.errors import UserError

__all__ = [
    "MODES",
    "SLOTS",
    "Judge",
    "JudgeConfig",
    "JudgeError",
    "JudgeSource",
    "JudgeStage",
    "Template",
    "assemble",
    "build_template",
    "judge_preferences",
    "agreement_report",
    "judge_scores",
    "last_logits",
    "load_source",
    "load_judge",
    "pairwise_judgement",
    "prepare_judge",
    "rank_from_preferences",
    "read_pairs",
    "render",
    "source_config",
    "token_map",
    "toy_demonstrations",
    "toy_ratings",
    "toy_score_edges",
    "build_toy_tokenizer",
]

MODES = ("pairwise", "pointwise")
SLOTS = ("principles", "prompt", "response_a", "response_b", "response")
_SLOT_RE = re.compile(r"\{(" + "|".join(SLOTS) + r")\}")
_REQUIRED = {"pairwise": ("response_a", "response_b"), "pointwise": ("response",)}
_ALLOWED = {
    "pairwise": ("prompt", "response_a", "response_b"),
    "pointwise": ("prompt", "response"),
}

DEFAULT_PAIRWISE = (
    "{principles}\n\n"
    "Prompt:\n{prompt}\n\n"
    "Response A:\n{response_a}\n\n"
    "Response B:\n{response_b}\n\n"
    "Which response is better? Answer with one letter, A or B.\n"
)
DEFAULT_POINTWISE = (
    "{principles}\n\n"
    "Prompt:\n{prompt}\n\n"
    "Response:\n{response}\n\n"
    "Rate the response from 1 (worst) to 10 (best). Answer with the number only.\n"
)
DEFAULT_PRINCIPLES = "Prefer the response that is more helpful, honest and harmless."


class JudgeError(UserError, ValueError):
    """A judge that cannot work as configured (template, answer tokens, tokenizer)."""


# ------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """An LM judge: which model, the template it reads, and the tokens its answer is read from."""

    model: str | None = None  # HF directory, a stage dir or a run dir (its policy); None = unset
    tokenizer: str | None = None  # tokenizer directory; None = the model's directory
    mode: str = "pairwise"  # "pairwise": P(A > B) | "pointwise": expected score
    template: str | None = None  # the template text with slots; None = template_file or default
    template_file: str | None = None  # a text file holding the template
    principles: str | None = None  # text for {principles}; None = principles_file or default
    principles_file: str | None = None  # a text file holding the principles (a constitution)
    answers: tuple[str, ...] = ("A", "B")  # pairwise: the tokens meaning "A better", "B better"
    # pointwise: the score tokens, each one token of the judge's vocabulary
    scores: tuple[str, ...] = ("1", "2", "3", "4", "5", "6", "7", "8", "9", "10")
    score_values: tuple[float, ...] = ()  # the value of each score token; () = its number
    use_chat_template: bool = True  # render through the tokenizer's chat template if it has one
    batch_size: int = 64  # rows per compiled judge call (pairwise: each run in both orders)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"judge mode={self.mode!r}: choose one of {MODES}")
        if self.template is not None and self.template_file is not None:
            raise ValueError("give the judge's template or template_file, not both")
        if self.principles is not None and self.principles_file is not None:
            raise ValueError("give the judge's principles or principles_file, not both")
        if len(self.answers) != 2 or len(set(self.answers)) != 2:
            raise ValueError(f"judge answers={self.answers!r}: give two different tokens")
        if len(self.scores) < 2 or len(set(self.scores)) != len(self.scores):
            raise ValueError(f"judge scores={self.scores!r}: give >= 2 different tokens")
        if self.score_values and len(self.score_values) != len(self.scores):
            raise ValueError(
                f"judge score_values has {len(self.score_values)} values for "
                f"{len(self.scores)} score tokens"
            )
        if self.batch_size < 1:
            raise ValueError(f"judge batch_size={self.batch_size}: must be >= 1")

    def template_text(self) -> str:
        """The template text (from ``template``, ``template_file`` or the mode's default)."""
        if self.template is not None:
            return self.template
        if self.template_file is not None:
            return _read_text(self.template_file, "template_file")
        return DEFAULT_PAIRWISE if self.mode == "pairwise" else DEFAULT_POINTWISE

    def principles_text(self) -> str:
        if self.principles is not None:
            return self.principles
        if self.principles_file is not None:
            return _read_text(self.principles_file, "principles_file")
        return DEFAULT_PRINCIPLES

    def values(self) -> tuple[float, ...]:
        """The score tokens' values (``score_values``, or each token read as a number)."""
        if self.score_values:
            return tuple(float(v) for v in self.score_values)
        try:
            return tuple(float(s) for s in self.scores)
        except ValueError:
            raise ConfigError(
                f"judge scores={self.scores!r} are not all numbers: set judge score_values"
            ) from None


@dataclasses.dataclass(frozen=True)
class JudgeStage(JudgeConfig):
    """``rlhf-jax judge``: label a file of pairs with a judge and report its agreement.

    Reads ``{prompt, chosen, rejected}`` rows (TRL preference data; the given label is "chosen is
    better") and writes ``<run.dir>/judge/judged.jsonl``: each pair ordered by the judge, with its
    probability ``P(chosen > rejected)`` as ``margin``, and whether it agrees with the file.
    ``report.json`` holds the agreement (ties 1/2) with a 95% interval, the mean probability given
    to the labelled winner and the share of pairs judged the same in both orders.
    """

    pairs_file: str = ""  # rows {prompt, chosen, rejected}
    limit: int | None = None  # judge only the first N rows


def _read_text(path: str, key: str) -> str:
    if not os.path.isfile(path):
        raise ConfigError(f"judge {key}={path!r}: no such file")
    with open(path, encoding="utf-8") as f:
        return f.read()


# ------------------------------------------------------------------------------------------
# Templates: text -> constant token pieces
# ------------------------------------------------------------------------------------------


@struct.dataclass
class Template:
    """A rendered judge template as arrays: what the pure functions take.

    Attributes:
      pieces: ``len(slots) + 1`` int32 vectors, the constant tokens around the slots.
      answers: ``[2]`` int32 (pairwise: "A", "B") or ``[S]`` (pointwise: the score tokens).
      values: ``[S]`` float32 score values (pointwise); ``[2]`` zeros in pairwise mode.
      drop: ``[D]`` int32 token ids masked out of the slot contents (the source tokenizer's
        ``<bos>`` and pad: a policy's prompt starts with its ``<bos>``).
      token_map: ``[V_src]`` int32 source-vocabulary id -> judge id, or None (same vocabulary).
      slots: the slot names in template order (static).
      mode: "pairwise" | "pointwise" (static).
    """

    pieces: tuple
    answers: jax.Array
    values: jax.Array
    drop: jax.Array
    token_map: Any = None
    slots: tuple = struct.field(pytree_node=False, default=())
    mode: str = struct.field(pytree_node=False, default="pairwise")


def _check_slots(text: str, mode: str, where: str) -> None:
    found = _SLOT_RE.findall(text)
    for name in _REQUIRED[mode]:
        if found.count(name) != 1:
            raise JudgeError(
                f"{where}: a {mode} template needs the slot {{{name}}} exactly once (found "
                f"{found.count(name)}); its slots are {{prompt}}, "
                + ", ".join("{" + s + "}" for s in _REQUIRED[mode])
                + " and {principles}"
            )
    for name in set(found):
        if name != "principles" and name not in _ALLOWED[mode]:
            raise JudgeError(f"{where}: the slot {{{name}}} is not one of a {mode} template")
        if found.count(name) > 1 and name != "principles":
            raise JudgeError(f"{where}: the slot {{{name}}} appears {found.count(name)} times")


_SENTINEL = "\u2063\u2063SLOT{}\u2063\u2063"


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render_parts(cfg: JudgeConfig, tokenizer) -> tuple[list[str], list[str], bool]:
    """The rendered text split at the slots: ``(texts [n+1], slots [n], chat)``."""
    text = cfg.template_text()
    where = "judge template" + (f" ({cfg.template_file})" if cfg.template_file else "")
    _check_slots(text, cfg.mode, where)
    text = text.replace("{principles}", cfg.principles_text())
    slots = [m.group(1) for m in _SLOT_RE.finditer(text) if m.group(1) != "principles"]
    for i, name in enumerate(slots):
        text = text.replace("{" + name + "}", _SENTINEL.format(i), 1)
    chat = cfg.use_chat_template and _has_chat_template(tokenizer)
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    parts = []
    for i in range(len(slots)):
        marker = _SENTINEL.format(i)
        if text.count(marker) != 1:
            raise JudgeError(
                f"{where}: the tokenizer's chat template does not keep the text of the slot "
                f"{{{slots[i]}}} intact; set use_chat_template=false"
            )
        head, text = text.split(marker)
        parts.append(head)
    parts.append(text)
    return parts, slots, chat


def render(cfg: JudgeConfig, tokenizer, values: Mapping[str, str]) -> str:
    """The text the judge reads for one row (``values``: slot name -> text), special tokens
    included as text where the chat template writes them. The judge itself tokenizes the pieces
    separately (see the module docstring); use this for demonstrations and for reading."""
    parts, slots, chat = _render_parts(cfg, tokenizer)
    out = parts[0]
    if not chat:
        out = _special_prefix_text(tokenizer) + out
    for name, part in zip(slots, parts[1:], strict=True):
        out += values[name] + part
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (``<bos>``; none for GPT-2)."""
    probe = "x"
    plain = _ids(tokenizer, probe)
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start]
    return []


def _special_prefix_text(tokenizer) -> str:
    ids = _special_prefix(tokenizer)
    return "".join(tokenizer.convert_ids_to_tokens(ids)) if ids else ""


def single_token(tokenizer, text: str, what: str) -> int:
    """The id of ``text`` when it is exactly one token of the tokenizer's vocabulary."""
    ids = _ids(tokenizer, text)
    unk = tokenizer.unk_token_id
    if len(ids) != 1 or (unk is not None and ids[0] == unk and text != tokenizer.unk_token):
        shown = tokenizer.convert_ids_to_tokens(ids) if ids else []
        raise JudgeError(
            f"judge {what} {text!r} is not a single token of the judge's vocabulary (it encodes "
            f"to {len(ids)} tokens {shown}): choose tokens the tokenizer has, e.g. with "
            "judge.answers=[...] or judge.scores=[...]"
        )
    return ids[0]


def token_map(source, judge_tokenizer) -> np.ndarray | None:
    """``[V_src]`` int32 mapping a source tokenizer's ids to the judge's by token string, or None
    when the two vocabularies are the same. Raises :class:`JudgeError` when a source token has no
    judge token (the judge could not read those responses from token ids: judge the text instead).
    """
    src, dst = source.get_vocab(), judge_tokenizer.get_vocab()
    if src == dst:
        return None
    size = max(src.values()) + 1
    out = np.full(size, -1, np.int64)
    for tok, i in src.items():
        out[i] = dst.get(tok, -1)
    missing = [t for t, i in src.items() if out[i] < 0]
    if missing:
        raise JudgeError(
            f"{len(missing)} of the policy's {len(src)} tokens are not in the judge's vocabulary "
            f"(e.g. {sorted(missing)[:5]}): the judge cannot read the policy's token ids; use a "
            "judge with the policy's tokenizer (or a superset of it)"
        )
    return out.astype(np.int32)


def build_template(tokenizer, cfg: JudgeConfig, *, source=None, vocab_size=None) -> Template:
    """Render ``cfg``'s template with ``tokenizer`` into a :class:`Template`, checking it.

    Raises :class:`JudgeError` (one line) for a template without its response slots, answer or
    score tokens that are not single tokens of the judge's vocabulary (or outside the model's
    ``vocab_size``), and a ``source`` tokenizer (the policy's, for judging token arrays) whose
    tokens the judge does not have.
    """
    parts, slots, chat = _render_parts(cfg, tokenizer)
    pieces = [_ids(tokenizer, p) for p in parts]
    if not chat:
        pieces[0] = _special_prefix(tokenizer) + pieces[0]
    if cfg.mode == "pairwise":
        answers = [single_token(tokenizer, a, "answer") for a in cfg.answers]
        values = [0.0, 0.0]
    else:
        answers = [single_token(tokenizer, s, "score token") for s in cfg.scores]
        values = list(cfg.values())
    if vocab_size is not None and max(answers) >= vocab_size:
        raise JudgeError(
            f"judge answer token id {max(answers)} is outside the model's vocabulary "
            f"({vocab_size}): use the tokenizer saved with the judge model"
        )
    src = tokenizer if source is None else source
    drop = sorted({t for t in (src.bos_token_id, src.pad_token_id) if t is not None})
    mapping = None if source is None else token_map(source, tokenizer)
    return Template(
        pieces=tuple(np.asarray(p, np.int32) for p in pieces),
        answers=np.asarray(answers, np.int32),
        values=np.asarray(values, np.float32),
        drop=np.asarray(drop or [-1], np.int32),
        token_map=mapping,
        slots=tuple(slots),
        mode=cfg.mode,
    )


# ------------------------------------------------------------------------------------------
# Pure functions (jittable): assemble the judge input, read the judgement
# ------------------------------------------------------------------------------------------


def assemble(
    template: Template, segments: Mapping[str, tuple[jax.Array, jax.Array]]
) -> tuple[jax.Array, jax.Array]:
    """The judge input ``(tokens, mask)`` ``[B, T]``: the template's pieces around the slots.

    ``segments`` maps each slot name to ``(tokens [B, L], mask [B, L])`` in the *source*
    vocabulary (mapped by ``template.token_map``); ids in ``template.drop`` are masked out.
    ``T = sum(len(piece)) + sum(L)``; padding stays in place as holes (mask 0).
    """
    tokens, mask = segments[template.slots[0]]
    b = tokens.shape[0]
    out_t, out_m = [], []

    def piece(p):
        p = jnp.asarray(p, jnp.int32)
        out_t.append(jnp.broadcast_to(p, (b, p.shape[0])))
        out_m.append(jnp.ones((b, p.shape[0]), jnp.int32))

    piece(template.pieces[0])
    for name, p in zip(template.slots, template.pieces[1:], strict=True):
        t, m = segments[name]
        chex.assert_rank([t, m], 2)
        chex.assert_equal_shape([t, m])
        t = t.astype(jnp.int32)
        keep = (m > 0) & ~jnp.isin(t, template.drop)
        if template.token_map is not None:
            t = jnp.asarray(template.token_map)[jnp.clip(t, 0, template.token_map.shape[0] - 1)]
        out_t.append(jnp.where(keep, t, 0))
        out_m.append(keep.astype(jnp.int32))
        piece(p)
    return jnp.concatenate(out_t, 1), jnp.concatenate(out_m, 1)


def last_logits(graphdef, params, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """``[B, V]`` float32 next-token logits after each row's last real token (holes allowed)."""
    from rlhf_jax.models import positions_from_mask, read_index

    module = nnx.merge(graphdef, params)
    mask = mask.astype(jnp.int32)
    hidden, _ = module(tokens.astype(jnp.int32), positions_from_mask(mask), mask)
    idx = read_index(mask, "last_nonpad")
    h = jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]  # [B, D]
    return module.lm_logits(h).astype(jnp.float32)


def pairwise_judgement(
    graphdef,
    params,
    template: Template,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    a_tokens: jax.Array,
    a_mask: jax.Array,
    b_tokens: jax.Array,
    b_mask: jax.Array,
) -> dict[str, jax.Array]:
    """The pairwise judgement of ``a`` against ``b``, both orders in one forward of ``2B`` rows.

    Args:
      prompt_tokens, prompt_mask: ``[B, P]`` (left-padded, as the policy's prompts).
      a_tokens, a_mask, b_tokens, b_mask: ``[B, R]`` (right-padded responses).

    Returns ``[B]`` arrays: ``preference`` ``P(a > b) = (p_AB + p_BA) / 2`` (module docstring),
    ``first`` ``p_AB`` (a shown first), ``second`` ``p_BA`` (a shown second, answer "B"),
    ``answer_mass`` the probability of the two answer tokens among all tokens (mean of the two
    orders: how well the judge keeps to the answer format), ``consistent`` 1.0 when both orders
    pick the same response.
    """
    if template.mode != "pairwise":
        raise ValueError("pairwise_judgement needs a pairwise template")
    b = prompt_tokens.shape[0]
    both = lambda x, y: jnp.concatenate([x, y], 0)  # noqa: E731
    segments = {
        "prompt": (both(prompt_tokens, prompt_tokens), both(prompt_mask, prompt_mask)),
        "response_a": (both(a_tokens, b_tokens), both(a_mask, b_mask)),
        "response_b": (both(b_tokens, a_tokens), both(b_mask, a_mask)),
    }
    tokens, mask = assemble(template, segments)
    logp = jax.nn.log_softmax(last_logits(graphdef, params, tokens, mask), -1)  # [2B, V]
    ans = logp[:, template.answers]  # [2B, 2]: log p("A"), log p("B")
    p = jax.nn.softmax(ans, -1)
    first, second = p[:b, 0], p[b:, 1]
    mass = jnp.exp(jax.nn.logsumexp(ans, -1))
    return {
        "preference": 0.5 * (first + second),
        "first": first,
        "second": second,
        "answer_mass": 0.5 * (mass[:b] + mass[b:]),
        "consistent": ((first > 0.5) == (second > 0.5)).astype(jnp.float32),
    }


def judge_preferences(
    graphdef,
    params,
    template: Template,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    a_tokens: jax.Array,
    a_mask: jax.Array,
    b_tokens: jax.Array,
    b_mask: jax.Array,
) -> jax.Array:
    """``[B]`` float32 ``P(a > b)``, position-debiased (:func:`pairwise_judgement`)."""
    return pairwise_judgement(
        graphdef, params, template, prompt_tokens, prompt_mask, a_tokens, a_mask, b_tokens, b_mask
    )["preference"]


def judge_scores(
    graphdef,
    params,
    template: Template,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    response_tokens: jax.Array,
    response_mask: jax.Array,
) -> jax.Array:
    """``[B]`` float32 expected score ``sum_k softmax(l_{s_k}) v_k`` over the score tokens.

    Args:
      prompt_tokens, prompt_mask: ``[B, P]``; response_tokens, response_mask: ``[B, R]``.
    """
    if template.mode != "pointwise":
        raise ValueError("judge_scores needs a pointwise template")
    segments = {
        "prompt": (prompt_tokens, prompt_mask),
        "response": (response_tokens, response_mask),
    }
    tokens, mask = assemble(template, segments)
    logits = last_logits(graphdef, params, tokens, mask)  # [B, V]
    p = jax.nn.softmax(logits[:, template.answers], -1)  # [B, S]
    return jnp.sum(p * jnp.asarray(template.values, jnp.float32), -1)


def rank_from_preferences(prefs: np.ndarray) -> list[list[int]]:
    """Best-first orders from ``prefs [N, K, K]`` (``prefs[n, i, j] = P(i > j)``): by the sum of
    each response's win probabilities (Borda count on P; ties by index)."""
    prefs = np.asarray(prefs, np.float64)
    k = prefs.shape[-1]
    wins = (prefs * (1 - np.eye(k))).sum(-1)  # [N, K]
    return [list(np.lexsort((np.arange(k), -w))) for w in wins]


# ------------------------------------------------------------------------------------------
# Host side: a loaded judge on a mesh, text in, numpy out
# ------------------------------------------------------------------------------------------


def _bucket(n: int) -> int:
    return max(8, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


@dataclasses.dataclass
class Judge:
    """A judge loaded and placed on a mesh: :meth:`preferences`, :meth:`scores`, :meth:`rank`.

    Texts are tokenized with the judge's tokenizer (prompts left-padded, responses right-padded,
    lengths rounded up to powers of two so that few shapes compile), run in chunks of
    ``config.batch_size`` rows, each split over the mesh's ``('data', 'fsdp')`` axes.
    """

    config: JudgeConfig
    model: Any  # rlhf_jax.models.Model
    tokenizer: Any
    template: Template
    mesh: Any = None

    def __post_init__(self):
        self._pairwise = jax.jit(pairwise_judgement, static_argnums=0)
        self._pointwise = jax.jit(judge_scores, static_argnums=0)

    # -- encoding --------------------------------------------------------------------------

    def _encode(self, texts: Sequence[str], *, left: bool) -> tuple[np.ndarray, np.ndarray]:
        ids = [_ids(self.tokenizer, t) for t in texts]
        length = _bucket(max((len(x) for x in ids), default=1))
        pad = self.tokenizer.pad_token_id or 0
        tokens = np.full((len(ids), length), pad, np.int32)
        mask = np.zeros((len(ids), length), np.int32)
        for i, x in enumerate(ids):
            if not x:
                continue
            sl = slice(length - len(x), length) if left else slice(0, len(x))
            tokens[i, sl], mask[i, sl] = x, 1
        return tokens, mask

    def _run(self, fn, arrays: list[np.ndarray]) -> Any:
        """``fn(graphdef, params, template, *arrays)`` in chunks; numpy results, concatenated."""
        from rlhf_jax import parallel

        n = len(arrays[0])
        per = 1 if self.mesh is None else parallel.axis_size(self.mesh, parallel.BATCH_AXES)
        chunk = min(self.config.batch_size, _bucket(n))
        chunk = -(-chunk // per) * per  # a multiple of the batch split
        outs = []
        for start in range(0, n, chunk):
            part = [a[start : start + chunk] for a in arrays]
            short = chunk - len(part[0])
            part = [np.concatenate([a, np.repeat(a[:1], short, 0)]) for a in part]
            if self.mesh is not None:
                part = parallel.shard_batch(part, self.mesh)
            out = jax.device_get(fn(self.model.graphdef, self.model.params, self.template, *part))
            outs.append(jax.tree.map(lambda x, k=chunk - short: np.asarray(x)[:k], out))
        return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

    # -- judgements ------------------------------------------------------------------------

    def judgement(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """:func:`pairwise_judgement` of each ``(prompt, a, b)`` text triple (numpy ``[N]``)."""
        if self.template.mode != "pairwise":
            raise JudgeError("this judge is pointwise: use scores(), or set judge.mode=pairwise")
        pt, pm = self._encode(prompts, left=True)
        texts = list(a) + list(b)
        rt, rm = self._encode(texts, left=False)
        n = len(prompts)
        arrays = [pt, pm, rt[:n], rm[:n], rt[n:], rm[n:]]
        return self._run(self._pairwise, arrays)

    def preferences(self, prompts, a, b) -> np.ndarray:
        """``[N]`` ``P(a > b)`` for text triples (position-debiased)."""
        return self.judgement(prompts, a, b)["preference"]

    def scores(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """``[N]`` expected scores of text pairs (pointwise mode)."""
        if self.template.mode != "pointwise":
            raise JudgeError("this judge is pairwise: use preferences(), or set mode=pointwise")
        pt, pm = self._encode(prompts, left=True)
        rt, rm = self._encode(responses, left=False)
        return self._run(self._pointwise, [pt, pm, rt, rm])

    def rank(
        self, prompts: Sequence[str], groups: Sequence[Sequence[str]]
    ) -> tuple[list[list[int]], np.ndarray]:
        """Best-first orders of each prompt's K responses, and ``prefs [N, K, K]``.

        Pairwise: every pair ``i < j`` is judged (both orders), ``prefs[n, i, j] = P(i > j)``,
        ``prefs[n, j, i] = 1 - P(i > j)``, ranked by :func:`rank_from_preferences`. Pointwise: by
        the expected score, ``prefs[n, i, j] = sigmoid(s_i - s_j)`` (Bradley-Terry on the
        expected scores, as the judge stage reads a pointwise judge).
        """
        k = len(groups[0]) if groups else 0
        if any(len(g) != k for g in groups):
            raise JudgeError("every prompt needs the same number of responses to rank")
        n = len(prompts)
        prefs = np.full((n, k, k), 0.5)
        if self.template.mode == "pointwise":
            flat = [r for g in groups for r in g]
            s = self.scores([p for p in prompts for _ in range(k)], flat).reshape(n, k)
            s = s.astype(np.float64)
            orders = [
                list(np.lexsort((np.arange(k), -row))) for row in s
            ]  # by score, ties by index
            return orders, 1.0 / (1.0 + np.exp(s[:, None, :] - s[:, :, None]))
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        p_rows = [prompts[m] for m in range(n) for _ in pairs]
        a_rows = [groups[m][i] for m in range(n) for i, _ in pairs]
        b_rows = [groups[m][j] for m in range(n) for _, j in pairs]
        p = self.preferences(p_rows, a_rows, b_rows).reshape(n, len(pairs))
        for c, (i, j) in enumerate(pairs):
            prefs[:, i, j] = p[:, c]
            prefs[:, j, i] = 1 - p[:, c]
        return rank_from_preferences(prefs), prefs


def load_judge(
    cfg: JudgeConfig,
    *,
    mesh=None,
    preset: str = "dp",
    source_tokenizer=None,
    key: str = "judge.model",
    load_model=None,
) -> Judge:
    """Load the judge ``cfg.model`` (a HF directory, stage dir or run dir), check its template,
    and place its parameters on ``mesh`` by the reward model's sharding rules (``preset``).

    ``source_tokenizer``: the policy's tokenizer when the judge will read the policy's token ids
    (checked by :func:`token_map`). ``load_model(path)``: a loader (the pipeline's, with the run's
    dtypes); default :func:`rlhf_jax.models.from_pretrained`. Everything is validated before any
    compile.
    """
    from rlhf_jax import models, parallel
    from rlhf_jax.pipeline import find_model

    if not cfg.model:
        raise ConfigError(f"{key} is not set: give the judge's Hugging Face model directory")
    path = find_model(cfg.model, key)
    tok_path = cfg.tokenizer or path
    try:
        tokenizer = models.load_tokenizer(tok_path)
    except (OSError, ValueError) as err:
        from rlhf_jax.errors import first_line

        raise ConfigError(
            f"{key}: cannot load a tokenizer from {tok_path} ({first_line(err)})"
        ) from None
    config = models.hf.read_hf_config(path)[0]
    vocab = config.get("vocab_size")
    template = build_template(tokenizer, cfg, source=source_tokenizer, vocab_size=vocab)
    model = (load_model or models.from_pretrained)(path)
    if mesh is not None:
        shardings = parallel.param_shardings(model.params, mesh, preset)
        model = model.replace(params=jax.device_put(model.params, shardings))
    return Judge(config=cfg, model=model, tokenizer=tokenizer, template=template, mesh=mesh)


# ------------------------------------------------------------------------------------------
# The judge as a reward source of rlhf_jax.scoring (direct RLAIF: PPO, GRPO, online DPO)
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class JudgeSource:
    """An LM judge inside the compiled step: a pointwise judge's expected score of each sampled
    response, or (online DPO) a pairwise judge's preference between a prompt's two samples.

    The :mod:`rlhf_jax.scoring` source protocol: ``__call__(params, rows) -> [N]`` with the
    judge's parameters as ``params`` (frozen, placed by the sharding rules like a reward model's)
    and ``rows`` a :class:`rlhf_jax.scoring.Responses`. The template is built with the policy's
    tokenizer as its source (its ``<bos>``/pad dropped, its ids mapped to the judge's).
    """

    graphdef: Any
    template: Template
    weight: float = 1.0  # w_k of the weighted sum
    name: str = "judge"  # metric name: score/<name>

    @property
    def pairwise(self) -> bool:
        return self.template.mode == "pairwise"

    def __call__(self, params: Any, rows: Any) -> jax.Array:
        if self.pairwise:
            raise ValueError("a pairwise judge has no score of one response: use preferences()")
        return judge_scores(
            self.graphdef,
            params,
            self.template,
            rows.prompt_tokens,
            rows.prompt_mask,
            rows.response_tokens,
            rows.response_mask,
        )

    def preferences(self, params: Any, rows: Any) -> jax.Array:
        """``[N / 2]`` position-debiased ``P(row 2i > row 2i+1)`` (:func:`judge_preferences`) of
        ``rows`` holding two responses to each prompt, one after the other."""
        if not self.pairwise:
            raise ValueError("a pointwise judge compares no pairs: call it for scores")
        a, b = slice(0, None, 2), slice(1, None, 2)
        return judge_preferences(
            self.graphdef,
            params,
            self.template,
            rows.prompt_tokens[a],
            rows.prompt_mask[a],
            rows.response_tokens[a],
            rows.response_mask[a],
            rows.response_tokens[b],
            rows.response_mask[b],
        )


def source_config(target: str, key: str, modes: Sequence[str] = ("pointwise",)) -> JudgeConfig:
    """The judge of a reward-source spec ``judge:<target>``: a YAML file holding a
    :class:`JudgeConfig` (``mode``, ``model``, ``template``, ...), or a model directory (the
    default pointwise template). ``modes``: the judge modes the caller can use (a reward reads a
    pointwise score; online DPO's labels can also come from a pairwise judge)."""
    if target.endswith((".yaml", ".yml")):
        from rlhf_jax import config as config_lib

        data, sources = config_lib.load_yaml(target)
        cfg = config_lib.from_dict(JudgeConfig, data, sources=sources)
    else:
        cfg = JudgeConfig(model=target or None, mode="pointwise")
    if cfg.mode not in modes:
        raise ConfigError(
            f"{key}: judge:{target} is a {cfg.mode} judge; a reward source reads a score: set "
            "mode: pointwise (and a template with a {response} slot); only online DPO's labels "
            "can come from a pairwise judge"
        )
    return cfg


def load_source(
    ctx: Any,
    target: str,
    weight: float,
    tokenizer: Any,
    key: str,
    modes: Sequence[str] = ("pointwise",),
):
    """``(JudgeSource, params)`` for ``judge:<target>[@w]`` (:func:`source_config`), checked
    against the policy's ``tokenizer`` before anything compiles."""
    cfg = source_config(target, key, modes)
    jd = load_judge(cfg, source_tokenizer=tokenizer, key=key, load_model=ctx.load_model)
    return JudgeSource(jd.model.graphdef, jd.template, weight=weight), jd.model.params


# ------------------------------------------------------------------------------------------
# The `judge` stage: label a file of pairs, report the agreement with its labels
# ------------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    """A row's text: a string as is, a list of messages as their contents, one per line."""
    if isinstance(value, str):
        return value
    return "\n".join(m["content"] for m in value)


def read_pairs(path: str, limit: int | None = None) -> list[tuple[str, str, str]]:
    """``(prompt, chosen, rejected)`` texts of a TRL preference file (JSONL / JSON / Parquet);
    a malformed row raises a one-line :class:`rlhf_jax.data.formats.DataError`."""
    from rlhf_jax.data import formats

    cfg = formats.DataConfig(kind="preference", max_prompt_length=1, max_completion_length=1)
    out = []
    for unit, number, row in formats.read_rows(path):
        try:
            prompt, (chosen, rejected), _ = formats.parse_row(row, cfg)
        except Exception as err:  # formats' row error: located and made one line here
            field = getattr(err, "field", None)
            raise formats.DataError(path, str(err), row=number, field=field, unit=unit) from None
        out.append((_text(prompt), _text(chosen), _text(rejected)))
        if limit is not None and len(out) >= limit:
            break
    return out


def _agree(p: np.ndarray) -> np.ndarray:
    return (p > 0.5) + 0.5 * (p == 0.5)


def agreement_report(
    p_given: np.ndarray,
    consistent: np.ndarray | None = None,
    first: np.ndarray | None = None,
    second: np.ndarray | None = None,
) -> dict:
    """The agreement of judged probabilities ``P(given chosen > given rejected)`` with the given
    labels: ties (``p = 1/2``) count 1/2, with a 95% t interval over pairs. With the pairwise
    judge's one-order probabilities, the agreement of each order alone (chosen shown first,
    second): what the debiasing over both orders corrects."""
    from rlhf_jax.stats import mean_ci

    p = np.asarray(p_given, np.float64)
    agree = mean_ci(_agree(p))
    out = {
        "pairs": int(p.size),
        "agreement": agree.mean,
        "agreement_low": agree.low,
        "agreement_high": agree.high,
        "mean_probability": float(p.mean()),
    }
    if consistent is not None:
        out["position_consistency"] = float(np.mean(consistent))
    if first is not None and second is not None:
        out["agreement_chosen_first"] = float(np.mean(_agree(np.asarray(first, np.float64))))
        out["agreement_chosen_second"] = float(np.mean(_agree(np.asarray(second, np.float64))))
    return out


def prepare_judge(ctx) -> Any:
    """The ``judge`` stage's prepare: load and check the pairs and the judge; ``finish`` judges
    every pair (both orders), writes ``judged.jsonl`` and ``report.json`` (see
    :class:`JudgeStage`)."""
    import json

    from rlhf_jax.pipeline import Outputs, Plan

    st = ctx.section
    if not st.pairs_file:
        raise ConfigError(
            "judge.pairs_file is not set: give a JSONL/JSON/Parquet file of "
            "{prompt, chosen, rejected} rows"
        )
    if not os.path.isfile(st.pairs_file):
        raise ConfigError(f"judge.pairs_file={st.pairs_file!r}: no such file")
    rows = read_pairs(st.pairs_file, st.limit)
    jd = load_judge(st, mesh=ctx.mesh, preset=ctx.cfg.parallel.preset, load_model=ctx.load_model)
    ctx.say(f"[judge] {st.pairs_file}: {len(rows)} pairs, {st.mode} judge {st.model}")

    def finish(state, result):
        prompts, chosen, rejected = (list(x) for x in zip(*rows, strict=True))
        consistent = first = second = None
        if st.mode == "pairwise":
            out = jd.judgement(prompts, chosen, rejected)
            p, consistent = out["preference"], out["consistent"]
            first, second = out["first"], out["second"]
        else:
            diff = jd.scores(prompts, chosen) - jd.scores(prompts, rejected)
            p = 1.0 / (1.0 + np.exp(-diff))  # Bradley-Terry on the expected scores
        report = agreement_report(p, consistent, first, second)
        records = []
        for i, (q, c, r) in enumerate(rows):
            win = p[i] >= 0.5
            records.append(
                {
                    "prompt": q,
                    "chosen": c if win else r,
                    "rejected": r if win else c,
                    "margin": float(max(p[i], 1 - p[i])),
                    "agrees": bool(p[i] > 0.5),
                }
            )
        if jax.process_index() == 0:
            from rlhf_jax.data.toy import write_jsonl

            write_jsonl(os.path.join(ctx.dir, "judged.jsonl"), records)
            with open(os.path.join(ctx.dir, "report.json"), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2)
        ctx.say(
            f"[judge] agreement with the given labels {report['agreement']:.3f} "
            f"(95% CI {report['agreement_low']:.3f} to {report['agreement_high']:.3f}, "
            f"{report['pairs']} pairs); mean P(given chosen) {report['mean_probability']:.3f}"
            + (
                f"; same verdict in both orders {report['position_consistency']:.3f}; one order "
                f"alone: chosen shown first {report['agreement_chosen_first']:.3f}, second "
                f"{report['agreement_chosen_second']:.3f}"
                if consistent is not None
                else ""
            )
            + f" -> {ctx.dir}/judged.jsonl"
        )
        return Outputs(info=report)

    return Plan(finish=finish, tokenizer=jd.tokenizer)


# ------------------------------------------------------------------------------------------
# The toy task's judge vocabulary (rlhf_jax.data.toy): the toy words plus the template's words
# ------------------------------------------------------------------------------------------

TOY_SCORES = tuple(str(i) for i in range(1, 11))
TOY_JUDGE_WORDS = ("Prompt", "Response", "A", "B", "Better", "Score", ":", *TOY_SCORES)
TOY_PAIRWISE = "Prompt : {prompt} Response A : {response_a} Response B : {response_b} Better :"
TOY_POINTWISE = "Prompt : {prompt} Response : {response} Score :"


def build_toy_tokenizer(out_dir: str | os.PathLike, *, chat_template: str | None = None) -> str:
    """The toy tokenizer extended with :data:`TOY_JUDGE_WORDS`, written to ``out_dir``.

    The toy words keep their ids (``rlhf_jax.data.toy.VOCAB[i]`` is id ``i``), so a toy policy's
    token ids are the judge's (:func:`token_map` is the identity on them); the judge words come
    after. Same special tokens and ``<bos>`` post-processor; a chat template only if given.
    """
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    from rlhf_jax.data import toy

    words = (*toy.VOCAB, *TOY_JUDGE_WORDS)
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token=toy.UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([*toy.SPECIAL_TOKENS, toy.STOP_TOKEN])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{toy.BOS} $A",
        pair=f"{toy.BOS} $A $B",
        special_tokens=[(toy.BOS, vocab[toy.BOS])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=toy.PAD,
        bos_token=toy.BOS,
        eos_token=toy.STOP_TOKEN,
        unk_token=toy.UNK,
        additional_special_tokens=[toy.EOS],
        padding_side="left",
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return str(out_dir)


def toy_demonstrations(records: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """SFT rows ``{prompt, completion}`` that teach a toy LM to answer :data:`TOY_PAIRWISE`.

    Each labelled pair ``{prompt, chosen, rejected}`` gives two rows, the chosen response shown
    first (answer ``"A"``) and second (``"B"``), so the demonstrations carry no position bias.
    """
    out = []
    for r in records:
        for first, second, answer in ((r["chosen"], r["rejected"], "A"),
                                      (r["rejected"], r["chosen"], "B")):  # fmt: skip
            text = TOY_PAIRWISE.format(prompt=r["prompt"], response_a=first, response_b=second)
            out.append({"prompt": text, "completion": answer})
    return out


def toy_score_edges(n: int = 20_000, seed: int = 0) -> np.ndarray:
    """The 9 inner deciles of the gold score over ``n`` SFT-corpus responses: score token ``k``
    ("1".."10") of :func:`toy_ratings` is the ``k``-th tenth of that distribution."""
    from rlhf_jax.data import toy

    rng = np.random.default_rng(seed)
    prompts = toy.sample_prompts(n, seed)
    gold = toy.gold_scores(prompts, [toy.sample_response(rng, p) for p in prompts])
    return np.quantile(gold, np.linspace(0.1, 0.9, 9))


def toy_ratings(
    prompts: Sequence[str], responses: Sequence[str], edges: np.ndarray
) -> list[dict[str, str]]:
    """SFT rows ``{prompt, completion}`` that teach a toy LM to answer :data:`TOY_POINTWISE`:
    the completion is the gold score's decile ``"1".."10"`` (:func:`toy_score_edges`)."""
    from rlhf_jax.data import toy

    gold = toy.gold_scores(prompts, responses)
    score = np.searchsorted(edges, gold, side="right") + 1  # 1..10
    return [
        {"prompt": TOY_POINTWISE.format(prompt=p, response=r), "completion": str(int(s))}
        for p, r, s in zip(prompts, responses, score, strict=True)
    ]


def toy_rated_responses(
    records: Sequence[Mapping[str, str]], *, malformed: float = 0.0, seed: int = 0
) -> tuple[list[str], list[str]]:
    """The ``(prompts, responses)`` a pointwise toy judge learns to rate (:func:`toy_ratings`):
    both responses of each comparison ``{prompt, chosen, rejected}``, then, with probability
    ``malformed`` each, a malformed copy of each well-formed one
    (:func:`rlhf_jax.data.toy.corrupt_response`), after all of them.

    The SFT corpus is 95.5% well-formed (a wrong article: 0.9% of 20,000 draws), so a judge that
    rates only its responses sees few malformed ones; the copies show it many more.
    """
    from rlhf_jax.data import toy

    if not 0.0 <= malformed <= 1.0:
        raise ValueError(f"malformed must be in [0, 1], got {malformed}")
    prompts = [r["prompt"] for r in records for _ in range(2)]
    responses = [x for r in records for x in (r["chosen"], r["rejected"])]
    rng = np.random.default_rng(seed)
    extra = [
        (p, toy.corrupt_response(rng, x))
        for p, x in zip(prompts, responses, strict=True)
        if toy.is_well_formed(x) and rng.random() < malformed
    ]
    return prompts + [p for p, _ in extra], responses + [x for _, x in extra]
