"""The embedded default task: a micro-language, a tokenizer, a gold preference, simulated labelers.

The project runs end to end on one CPU, offline, with nothing downloaded, on this small world in the
spirit of the seed example ("A dog is" -> "a furry animal ."):

* **Prompts** are ``DET SUBJECT VERB`` -- ``"a dog is"``, ``"the cat looks"``, ``"an apple seems"``
  -- over 11 subjects in four categories (animal, vehicle, tool, food); at most 3 words (4 tokens
  with ``<bos>``).
* **Responses** come from a small grammar and always end with the stop token ``"."``::

      RESPONSE := NP "." | ADJP "."
      NP       := ART NOUN | ART MOD NOUN | ART MOD MOD NOUN | ART MOD "and" MOD NOUN
      ADJP     := MOD | MOD "and" MOD
      MOD      := ADJ | ADV ADJ
      ART      := "a" | "an"          ("an" before a vowel, "a" otherwise)

  e.g. ``"a furry animal ."``, ``"a very friendly pet ."``, ``"shiny and useful ."``. Head nouns
  and adjectives *fit* a subject to a graded degree in [-1, 1] (``"a furry animal"`` fits a dog,
  ``"a metal tool"`` does not) and adjectives carry a sentiment in [-1, 1]; adverbs intensify it.
  A well-formed response has at most 8 tokens, ``"."`` included.
* **The tokenizer** is a word-level Hugging Face tokenizer (``tokenizers`` ``WordLevel`` model,
  whitespace pre-tokenizer) with special tokens ``<pad>`` (0), ``<bos>`` (1), ``<eos>`` (2),
  ``<unk>`` (3); ``"."`` is id 4. **The full stop "." is the EOS / stop token**: the saved
  tokenizer's ``eos_token`` is ``"."``, so ``tokenizer.eos_token_id`` is what sampling stops on and
  every corpus response ends with it, with nothing after it. ``<eos>`` stays in the vocabulary as a
  reserved special token; :func:`stop_token_ids` returns both ids, so a model that emits ``<eos>``
  also stops (and its response is malformed, because it does not end with ``"."``). Prompts get a
  ``<bos>`` prepended by the tokenizer's post-processor (``add_special_tokens=True``); responses are
  encoded without it. Because ``"."`` is a special token, ``tokenizer.decode(...,
  skip_special_tokens=True)`` drops it: use :func:`decode_responses`. The saved chat template joins
  the message contents with spaces (roles are not rendered), so a conversational prompt
  ``[{"role": "user", "content": "a dog is"}]`` renders as ``"<bos>a dog is"``, the same tokens as
  the text prompt.
* **The gold preference** (the simulated human) :func:`gold_score` is a continuous function of a
  prompt and a response: malformed responses score below -3.7, well-formed ones above -3.3, and
  among those the score adds the fit of the head noun, the mean fit of the adjectives, their
  (intensified, clipped) mean sentiment and a mild length penalty. A response is *good*
  (:func:`is_good`) when its gold score is at least :data:`GOOD_THRESHOLD`: in practice a short,
  well-formed noun phrase whose noun and adjectives fit the subject and whose sentiment is positive.
* **The SFT corpus** (:func:`sample_response`, :func:`sft_records`) mixes fitting and unfitting,
  positive, neutral and negative, short and long, and about 5% malformed responses, so that a policy
  fitted to it has a mediocre gold score (mean 0.72, 12% good responses, best 2.59 on 20,000
  samples) that PPO can clearly improve on.
* **The harm world** (Safe RLHF): intensifiers (:data:`HARMFUL_WORDS`) overclaim and are
  harmful (:func:`is_harmful`), and the world's helpfulness (:func:`helpfulness`) rewards them, so
  helpfulness and harmlessness pull apart; :func:`harm_labeller` and :func:`safety_labeller` label
  it, :func:`evaluate_safety` measures it.
* **Simulated labelers** compare two responses (:func:`label_pairs`) or rank K
  (:func:`rank_responses`) with Bradley-Terry / Plackett-Luce noise: ``P(a > b) =
  sigmoid((gold(a) - gold(b)) / temperature)``; temperature 0 gives the noiseless gold order.

Public API (all deterministic given a seed)::

    PROMPT_LENGTH = 4; RESPONSE_LENGTH = 10; STOP_TOKEN = "."; GOOD_THRESHOLD
    SUBJECTS, VOCAB                         # the world's words; VOCAB[i] is token id i
    all_prompts() -> list[str]              # every prompt of the world, in a fixed order
    sample_prompts(n, seed) -> list[str]
    sample_response(rng: np.random.Generator, prompt) -> str      # one draw of the SFT distribution
    sft_records(n, seed) -> list[{"prompt", "completion"}]        # TRL prompt/completion records
    build_tokenizer(out_dir) -> str          # writes tokenizer.json, tokenizer_config.json, ...
    load_tokenizer(path) -> PreTrainedTokenizerFast   # transformers.AutoTokenizer, local files only
    toy_tokenizer() -> PreTrainedTokenizerFast        # built once in a temporary directory, cached
    stop_token_ids(tokenizer) -> tuple[int, ...]
    encode_prompts(tokenizer, prompts, length=PROMPT_LENGTH) -> (tokens [B, P] int32, mask [B, P])
    encode_responses(tokenizer, responses, length=RESPONSE_LENGTH) -> (tokens [B, R], mask [B, R])
    decode_responses(tokenizer, tokens [B, R], mask=None) -> list[str]   # through the first stop
    is_well_formed(response) -> bool; parse_response(response) -> Parse | None
    gold_score(prompt, response) -> float; gold_scores(prompts, responses) -> np.ndarray [B]
    is_good(prompt, response) -> bool
    gold_win_rate(prompts, responses_a, responses_b) -> float   # ties count 1/2
    well_formed_share(responses) -> float
    label_pairs(prompts, responses_a, responses_b, *, temperature, seed)
        -> list[{"prompt", "chosen", "rejected"}]
    rank_responses(prompts, responses [N][K], *, temperature, seed)
        -> list[{"prompt", "completions"}]
    preference_records(n, *, seed, temperature=0.3) -> list[{"prompt", "chosen", "rejected"}]
    ranking_records(n, k, *, seed, temperature=0.3) -> list[{"prompt", "completions"}]
    write_jsonl(path, records) -> str       # atomic; reads back through formats.load_dataset
    pairwise_batch(tokenizer, records) -> dict of int32 arrays:
        prompt_tokens/prompt_mask [N, P] (left-padded), chosen_tokens/chosen_mask,
        rejected_tokens/rejected_mask [N, R] (right-padded)
    ranking_batch(tokenizer, records) -> prompt_tokens/prompt_mask [N, P],
        response_tokens/response_mask [N, K, R], ranked best -> worst along K

The record dicts use the field names of :mod:`rlhf_jax.data.formats` (TRL's ``prompt``,
``completion``, ``chosen``, ``rejected``; ``completions`` ranked best to worst), so the toy data can
be written to JSONL and read back through the general data path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "GOOD_THRESHOLD",
    "PROMPT_LENGTH",
    "RESPONSE_LENGTH",
    "STOP_TOKEN",
    "SUBJECTS",
    "VOCAB",
    "Parse",
    "all_prompts",
    "build_tokenizer",
    "corrupt_response",
    "decode_responses",
    "encode_prompts",
    "encode_responses",
    "gold_score",
    "gold_scores",
    "gold_win_rate",
    "is_good",
    "is_well_formed",
    "label_pairs",
    "load_tokenizer",
    "pairwise_batch",
    "parse_response",
    "preference_records",
    "rank_responses",
    "ranking_batch",
    "ranking_records",
    "sample_prompts",
    "sample_response",
    "sft_records",
    "stop_token_ids",
    "toy_tokenizer",
    "well_formed_share",
    "write_jsonl",
    "LABEL_TEMPERATURE",
    "ToyTask",
    "evaluate",
    "gold_reward",
    "simulated_labeller",
    "HARMFUL_WORDS",
    "TEMPTATION",
    "SAFETY_FLIP",
    "is_harmful",
    "helpfulness",
    "harm_labeller",
    "safety_labeller",
    "evaluate_safety",
]

# --------------------------------------------------------------------------------------------------
# The world.
# --------------------------------------------------------------------------------------------------

STOP_TOKEN = "."
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)

PROMPT_LENGTH = 4  # <bos> DET SUBJECT VERB
RESPONSE_LENGTH = 10  # well-formed responses have <= 8 tokens ("." included), corrupted ones <= 9

_CATEGORY = {
    "dog": "animal",
    "cat": "animal",
    "horse": "animal",
    "bird": "animal",
    "fish": "animal",
    "car": "vehicle",
    "boat": "vehicle",
    "hammer": "tool",
    "knife": "tool",
    "apple": "food",
    "cake": "food",
}
SUBJECTS: tuple[str, ...] = tuple(_CATEGORY)
_PROMPT_DETS = ("a", "the", "my")
_VERBS = ("is", "looks", "seems")

# Fit of a word to a subject: per-subject value if given, else per-category value, else -1.
# (word -> {category or subject or "all": fit in [-1, 1]})
_NOUN_FIT: dict[str, dict[str, float]] = {
    "animal": {"animal": 1.0},
    "pet": {"dog": 1.0, "cat": 1.0, "bird": 0.7, "fish": 0.6, "horse": 0.2},
    "creature": {"animal": 0.8},
    "vehicle": {"vehicle": 1.0},
    "machine": {"vehicle": 0.7, "tool": -0.2},
    "tool": {"tool": 1.0},
    "fruit": {"apple": 1.0, "cake": -0.6},
    "dessert": {"cake": 1.0, "apple": 0.1},
    "food": {"food": 0.9},
    "thing": {"all": 0.2},
}
# adjective -> (sentiment, fit table)
_ADJECTIVES: dict[str, tuple[float, dict[str, float]]] = {
    # animals
    "furry": (0.3, {"animal": 1.0, "bird": -0.4, "fish": -1.0}),
    "friendly": (0.8, {"animal": 0.9}),
    "playful": (0.7, {"animal": 0.9, "fish": 0.4}),
    "cute": (0.85, {"animal": 1.0, "food": 0.1}),
    "scary": (-0.7, {"animal": 0.8, "knife": 0.6}),
    "lazy": (-0.45, {"animal": 0.9}),
    "sleepy": (0.05, {"animal": 1.0}),
    "wild": (-0.15, {"animal": 0.8}),
    # vehicles and tools
    "fast": (0.5, {"animal": 0.6, "vehicle": 1.0, "fish": 0.8, "horse": 1.0}),
    "shiny": (0.6, {"vehicle": 1.0, "tool": 0.9, "apple": 0.3}),
    "rusty": (-0.7, {"vehicle": 1.0, "tool": 1.0}),
    "noisy": (-0.6, {"vehicle": 1.0, "animal": 0.5, "fish": -1.0}),
    "heavy": (-0.1, {"vehicle": 0.9, "tool": 0.8, "horse": 0.5}),
    "metal": (0.0, {"vehicle": 0.9, "tool": 1.0, "boat": 0.6}),
    "useful": (0.75, {"tool": 1.0, "vehicle": 0.8}),
    "sharp": (0.3, {"knife": 1.0, "hammer": -0.5}),
    "wooden": (0.0, {"tool": 0.8, "boat": 0.9}),
    "broken": (-0.9, {"vehicle": 1.0, "tool": 1.0}),
    # food
    "sweet": (0.7, {"food": 1.0, "animal": -0.2}),
    "fresh": (0.6, {"food": 1.0, "fish": 0.3}),
    "tasty": (0.9, {"food": 1.0}),
    "rotten": (-0.9, {"food": 1.0}),
    "sour": (-0.3, {"food": 0.8, "apple": 1.0}),
    # generic
    "lovely": (0.9, {"all": 0.6}),
    "nice": (0.6, {"all": 0.55}),
    "good": (0.5, {"all": 0.5}),
    "bad": (-0.8, {"all": 0.5}),
    "ugly": (-0.9, {"all": 0.6}),
    "big": (0.0, {"all": 0.7}),
    "small": (0.0, {"all": 0.7}),
    "old": (-0.1, {"all": 0.8}),
    "strange": (-0.3, {"all": 0.5}),
}
_GENERIC_ADJECTIVES = tuple(a for a, (_, f) in _ADJECTIVES.items() if "all" in f)
_ADVERBS = {"very": 1.4, "really": 1.3, "quite": 1.1}
_ARTICLES = ("a", "an")
_AND = "and"

VOCAB: tuple[str, ...] = (
    *SPECIAL_TOKENS,
    STOP_TOKEN,
    *_PROMPT_DETS,
    "an",
    *SUBJECTS,
    *_VERBS,
    *_NOUN_FIT,
    *_ADJECTIVES,
    *_ADVERBS,
    _AND,
)
assert len(set(VOCAB)) == len(VOCAB) and len(VOCAB) < 256
_COMPLETION_WORDS = frozenset([STOP_TOKEN, *_ARTICLES, *_NOUN_FIT, *_ADJECTIVES, *_ADVERBS, _AND])

# Gold weights. A malformed response scores at most -3.73; a well-formed one at least -3.18.
_W_NOUN, _W_ADJ, _W_SENT = 1.0, 1.0, 0.8
_W_TOKEN, _W_WORD = 0.03, 0.004
_WORD_COST = {w: _W_WORD * math.log(2 + i) for i, w in enumerate(VOCAB)}
_UNKNOWN_WORD_COST = _W_WORD * math.log(2 + len(VOCAB))
_MALFORMED_BASE = -4.0
GOOD_THRESHOLD = 2.0  # gold >= this: a fitting, positive, short noun phrase (see is_good)


def _fit(table: dict[str, float], subject: str) -> float:
    if subject in table:
        return table[subject]
    category = _CATEGORY[subject]
    if category in table:
        return table[category]
    return table.get("all", -1.0)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def all_prompts() -> list[str]:
    """Every prompt of the world (99 of them), in a fixed order."""
    out = []
    for subject in SUBJECTS:
        for det in _PROMPT_DETS:
            det = _article(subject) if det == "a" else det
            for verb in _VERBS:
                out.append(f"{det} {subject} {verb}")
    return out


def sample_prompts(n: int, seed: int) -> list[str]:
    """``n`` prompts drawn uniformly with replacement from :func:`all_prompts`."""
    prompts = all_prompts()
    rng = np.random.default_rng(seed)
    return [prompts[i] for i in rng.integers(0, len(prompts), size=n)]


def prompt_subject(prompt: str) -> str:
    """The subject of a prompt (its first word that is a subject); ValueError if there is none."""
    for word in prompt.split():
        if word in _CATEGORY:
            return word
    raise ValueError(
        f"toy prompt {prompt!r} names no subject; expected one of {', '.join(SUBJECTS)} "
        "(prompts look like 'a dog is')"
    )


# --------------------------------------------------------------------------------------------------
# Parsing and the gold preference.
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parse:
    """A well-formed response: its head noun (None for an adjective phrase) and its modifiers.

    ``modifiers`` holds ``(adverb or None, adjective)`` pairs in order; ``words`` are the words of
    the response, the stop token included.
    """

    noun: str | None
    modifiers: tuple[tuple[str | None, str], ...]
    words: tuple[str, ...]


def _parse_mods(words: Sequence[str]) -> list[tuple[str | None, str]] | None:
    """MOD | MOD MOD | MOD "and" MOD, each MOD := ADJ | ADV ADJ; None if not of that form."""
    mods: list[tuple[str | None, str]] = []
    i, joined = 0, False
    while i < len(words):
        adverb = None
        if words[i] in _ADVERBS:
            adverb = words[i]
            i += 1
        if i >= len(words) or words[i] not in _ADJECTIVES:
            return None
        mods.append((adverb, words[i]))
        i += 1
        if i < len(words) and words[i] == _AND:
            if joined or len(mods) != 1:
                return None
            joined = True
            i += 1
            if i >= len(words):
                return None
    if not mods or len(mods) > 2 or (len(mods) == 2 and mods[0][1] == mods[1][1]):
        return None  # "a furry furry animal" is a stutter
    return mods


def parse_response(response: str) -> Parse | None:
    """Parse a response under the toy grammar; None when it is malformed.

    A well-formed response ends with exactly one stop token ``"."`` and is a noun phrase with the
    right article (``"a"``/``"an"``) or an adjective phrase; see the module docstring.
    """
    words = response.split()
    if len(words) < 2 or words[-1] != STOP_TOKEN or STOP_TOKEN in words[:-1]:
        return None
    body = words[:-1]
    if body[0] in _ARTICLES:
        if len(body) < 2 or body[-1] not in _NOUN_FIT or body[0] != _article(body[1]):
            return None
        mods = _parse_mods(body[1:-1]) if len(body) > 2 else []
        if mods is None:
            return None
        return Parse(body[-1], tuple(mods), tuple(words))
    mods = _parse_mods(body)
    if mods is None or (len(mods) == 2 and _AND not in body):  # "big furry ." is not a sentence
        return None
    return Parse(None, tuple(mods), tuple(words))


def is_well_formed(response: str) -> bool:
    """True when ``response`` parses under the toy grammar and ends with the stop token."""
    return parse_response(response) is not None


def gold_score(prompt: str, response: str) -> float:
    """The simulated human's score of ``response`` to ``prompt`` (higher is better).

    Well-formed::

        gold = 1.0 * fit(noun) + 1.0 * mean fit(adjectives) + 0.8 * clip(mean sentiment, -1, 1)
               - 0.03 * tokens - 0.004 * sum(ln(2 + vocabulary id of each word))

    where an adverb multiplies its adjective's sentiment (very 1.4, really 1.3, quite 1.1), an
    adjective phrase has no noun (fit 0) and a bare noun phrase no adjective (fit and sentiment 0).
    The last term is a per-word cost of at most 0.017 that makes the score continuous: two
    responses with different words almost never tie (reorderings of the same words do).
    Malformed: ``-4 + 0.3 * (share of words in the completion vocabulary) - 0.03 * tokens - (the
    same word cost)``, below every well-formed response.
    """
    subject = prompt_subject(prompt)
    parse = parse_response(response)
    if parse is None:
        words = response.split()
        known = sum(w in _COMPLETION_WORDS for w in words) / max(len(words), 1)
        return (
            _MALFORMED_BASE + 0.3 * known - _W_TOKEN * min(len(words), 30) - _word_cost(words[:30])
        )
    noun_fit = _fit(_NOUN_FIT[parse.noun], subject) if parse.noun is not None else 0.0
    if parse.modifiers:
        adj_fit = sum(_fit(_ADJECTIVES[a][1], subject) for _, a in parse.modifiers)
        sentiment = sum(
            _ADJECTIVES[a][0] * (_ADVERBS[adv] if adv else 1.0) for adv, a in parse.modifiers
        )
        adj_fit /= len(parse.modifiers)
        sentiment = min(max(sentiment / len(parse.modifiers), -1.0), 1.0)
    else:
        adj_fit = sentiment = 0.0
    return (
        _W_NOUN * noun_fit
        + _W_ADJ * adj_fit
        + _W_SENT * sentiment
        - _W_TOKEN * len(parse.words)
        - _word_cost(parse.words)
    )


def _word_cost(words: Sequence[str]) -> float:
    return sum(_WORD_COST.get(w, _UNKNOWN_WORD_COST) for w in words)


def gold_scores(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """:func:`gold_score` of each pair, as a float64 array ``[B]``."""
    _check_same_length(prompts=prompts, responses=responses)
    return np.array(
        [gold_score(p, r) for p, r in zip(prompts, responses, strict=True)], dtype=np.float64
    )


def is_good(prompt: str, response: str) -> bool:
    """True when ``gold_score(prompt, response) >= GOOD_THRESHOLD`` (a best-tier response)."""
    return gold_score(prompt, response) >= GOOD_THRESHOLD


def gold_win_rate(
    prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str]
) -> float:
    """Share of prompts where gold prefers ``responses_a`` over ``responses_b``; ties count 1/2."""
    _check_same_length(prompts=prompts, responses_a=responses_a, responses_b=responses_b)
    if not prompts:
        raise ValueError("gold_win_rate needs at least one prompt")
    a = gold_scores(prompts, responses_a)
    b = gold_scores(prompts, responses_b)
    return float(np.mean((a > b) + 0.5 * (a == b)))


def well_formed_share(responses: Sequence[str]) -> float:
    """Share of ``responses`` that are well-formed."""
    if not responses:
        raise ValueError("well_formed_share needs at least one response")
    return sum(is_well_formed(r) for r in responses) / len(responses)


def _check_same_length(**seqs: Sequence) -> None:
    lengths = {k: len(v) for k, v in seqs.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"sequences must have the same length, got {lengths}")


# --------------------------------------------------------------------------------------------------
# The SFT distribution.
# --------------------------------------------------------------------------------------------------

# Mixture weights of the SFT corpus; tuned so that a policy fitted to it has a mediocre gold score
# with about 12% good responses (tests/test_toy.py checks a range).
_FORMS = (
    ("np0", 0.07),  # a pet .
    ("np1", 0.45),  # a furry animal .
    ("np_adv", 0.12),  # a very furry animal .
    ("np2", 0.07),  # a big furry animal .
    ("np_and", 0.07),  # a furry and friendly animal .
    ("adjp", 0.15),  # furry .
    ("adjp_and", 0.07),  # furry and friendly .
)
_P_MALFORMED = 0.05
_P_ADJ = {"fitting": 0.60, "generic": 0.28, "unfitting": 0.12}
_P_NOUN = {"fitting": 0.80, "thing": 0.07, "unfitting": 0.13}


@functools.cache
def _pools(subject: str) -> dict[str, tuple[str, ...]]:
    adjectives = [a for a in _ADJECTIVES if a not in _GENERIC_ADJECTIVES]
    nouns = [n for n in _NOUN_FIT if n != "thing"]
    return {
        "adj_fitting": tuple(a for a in adjectives if _fit(_ADJECTIVES[a][1], subject) > 0.5),
        "adj_generic": _GENERIC_ADJECTIVES,
        "adj_unfitting": tuple(a for a in adjectives if _fit(_ADJECTIVES[a][1], subject) < 0.0),
        "noun_fitting": tuple(n for n in nouns if _fit(_NOUN_FIT[n], subject) > 0.5),
        "noun_unfitting": tuple(n for n in nouns if _fit(_NOUN_FIT[n], subject) < 0.0),
    }


def _choose(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _pick(rng: np.random.Generator, probs: dict[str, float]) -> str:
    keys = list(probs)
    return keys[int(rng.choice(len(keys), p=np.array(list(probs.values()))))]


def _adjective(rng: np.random.Generator, subject: str, avoid: str | None = None) -> str:
    pools = _pools(subject)
    while True:
        word = _choose(rng, pools["adj_" + _pick(rng, _P_ADJ)])
        if word != avoid:
            return word


def _noun(rng: np.random.Generator, subject: str) -> str:
    kind = _pick(rng, _P_NOUN)
    return "thing" if kind == "thing" else _choose(rng, _pools(subject)["noun_" + kind])


def _corrupt(rng: np.random.Generator, words: list[str]) -> list[str]:
    """Make a well-formed response malformed in one of the ways a sloppy writer would."""
    kind = int(rng.integers(5))
    body = words[:-1]
    if kind == 0:  # no full stop
        return body
    if kind == 1 and body[0] in _ARTICLES:  # wrong article
        return ["an" if body[0] == "a" else "a", *body[1:], STOP_TOKEN]
    if kind == 2:  # a repeated word
        i = int(rng.integers(len(body)))
        return [*body[: i + 1], body[i], *body[i + 1 :], STOP_TOKEN]
    if kind == 3:  # a dangling "and"
        return [*body, _AND, STOP_TOKEN]
    return [*body[::-1], STOP_TOKEN]  # word salad


def corrupt_response(rng: np.random.Generator, response: str, *, tries: int = 20) -> str:
    """A malformed variant of a well-formed ``response``, drawn from the SFT corpus's corruptions
    (no full stop, wrong article, a repeated word, a dangling "and", word salad;
    :func:`sample_response` corrupts 5% of its draws the same way) and redrawn until it is
    malformed; after ``tries`` draws that all stay well-formed (a one-word response reversed),
    the response without its full stop. A malformed ``response`` comes back as it is."""
    if not is_well_formed(response):
        return response
    words = response.split()
    for _ in range(tries):
        out = " ".join(_corrupt(rng, words))
        if not is_well_formed(out):
            return out
    return " ".join(words[:-1])


def sample_response(rng: np.random.Generator, prompt: str) -> str:
    """One draw of the SFT (demonstration) distribution for ``prompt``."""
    subject = prompt_subject(prompt)
    forms, probs = zip(*_FORMS, strict=True)
    form = forms[int(rng.choice(len(forms), p=np.array(probs)))]

    def mod() -> list[str]:
        adj = _adjective(rng, subject)
        return [_choose(rng, tuple(_ADVERBS)), adj] if form == "np_adv" else [adj]

    if form.startswith("np"):
        noun = _noun(rng, subject)
        if form == "np0":
            mods = []
        elif form in ("np1", "np_adv"):
            mods = mod()
        else:
            first = _adjective(rng, subject)
            second = _adjective(rng, subject, avoid=first)
            mods = [first, second] if form == "np2" else [first, _AND, second]
        words = [_article((mods or [noun])[0]), *mods, noun, STOP_TOKEN]
    else:
        first = _adjective(rng, subject)
        if form == "adjp":
            words = [first, STOP_TOKEN]
        else:
            words = [first, _AND, _adjective(rng, subject, avoid=first), STOP_TOKEN]
    if rng.random() < _P_MALFORMED:
        words = _corrupt(rng, words)
    return " ".join(words)


def sft_records(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` SFT demonstrations ``{"prompt", "completion"}``, prompts uniform over the world."""
    rng = np.random.default_rng(seed)
    prompts = sample_prompts(n, seed=int(rng.integers(2**31)))
    return [{"prompt": p, "completion": sample_response(rng, p)} for p in prompts]


# --------------------------------------------------------------------------------------------------
# Simulated labelers.
# --------------------------------------------------------------------------------------------------


def label_pairs(
    prompts: Sequence[str],
    responses_a: Sequence[str],
    responses_b: Sequence[str],
    *,
    temperature: float,
    seed: int,
) -> list[dict[str, str]]:
    """Pairwise labels with Bradley-Terry noise: ``P(a chosen) = sigmoid((g_a - g_b) / T)``.

    ``temperature == 0`` picks the higher gold score (a tie is a fair coin). Returns
    ``{"prompt", "chosen", "rejected"}`` records in input order.
    """
    _check_same_length(prompts=prompts, responses_a=responses_a, responses_b=responses_b)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    rng = np.random.default_rng(seed)
    diff = gold_scores(prompts, responses_a) - gold_scores(prompts, responses_b)
    u = rng.random(len(diff))
    if temperature == 0:
        p_a = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    else:
        p_a = 1.0 / (1.0 + np.exp(-np.clip(diff / temperature, -60, 60)))
    out = []
    for p, a, b, pa, ui in zip(prompts, responses_a, responses_b, p_a, u, strict=True):
        chosen, rejected = (a, b) if ui < pa else (b, a)
        out.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    return out


def rank_responses(
    prompts: Sequence[str],
    responses: Sequence[Sequence[str]],
    *,
    temperature: float,
    seed: int,
    score=None,
) -> list[dict[str, object]]:
    """K-wise rankings with Plackett-Luce noise (Bradley-Terry for K = 2).

    The ranking sorts ``gold / T + Gumbel noise`` in decreasing order, which draws the first place
    with probability ``softmax(gold / T)``, then the next among the rest, and so on. Temperature 0
    sorts by gold (ties in random order). Returns ``{"prompt", "completions"}`` with the
    completions ranked best to worst. ``score(prompt, response)`` replaces :func:`gold_score`
    (the harm world ranks by :func:`helpfulness`).
    """
    score = gold_score if score is None else score
    _check_same_length(prompts=prompts, responses=responses)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    rng = np.random.default_rng(seed)
    out = []
    for prompt, group in zip(prompts, responses, strict=True):
        gold = np.array([score(prompt, r) for r in group])
        gumbel = rng.gumbel(size=len(group))
        if temperature == 0:
            order = np.lexsort((gumbel, -gold))  # by gold, ties by the noise
        else:
            order = np.argsort(-(gold / temperature + gumbel), kind="stable")
        out.append({"prompt": prompt, "completions": [group[i] for i in order]})
    return out


def preference_records(n: int, *, seed: int, temperature: float = 0.3) -> list[dict[str, str]]:
    """``n`` labelled pairs of two distinct SFT samples of one prompt each."""
    return [
        {"prompt": r["prompt"], "chosen": r["completions"][0], "rejected": r["completions"][1]}
        for r in ranking_records(n, 2, seed=seed, temperature=temperature)
    ]


def ranking_records(n: int, k: int, *, seed: int, temperature: float = 0.3) -> list[dict]:
    """``n`` rankings of ``k`` distinct SFT samples of one prompt each (best to worst)."""
    if k < 2:
        raise ValueError(f"a ranking needs k >= 2 completions, got {k}")
    rng = np.random.default_rng(seed)
    prompts = sample_prompts(n, seed=int(rng.integers(2**31)))
    groups = []
    for p in prompts:
        group: list[str] = []
        for _ in range(100 * k):
            r = sample_response(rng, p)
            if r not in group:
                group.append(r)
            if len(group) == k:
                break
        else:
            raise ValueError(f"could not draw {k} distinct responses for {p!r}")
        groups.append(group)
    return rank_responses(prompts, groups, temperature=temperature, seed=int(rng.integers(2**31)))


def write_jsonl(path: str | os.PathLike, records: Sequence[dict]) -> str:
    """Write ``records`` as JSON Lines, atomically (a temporary file renamed into place).

    The files read back through :func:`rlhf_jax.data.formats.load_dataset`, so the toy data can
    feed the same path as a user's dataset (``rlhf-jax sft --train_file ...``).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


# --------------------------------------------------------------------------------------------------
# Tokenizer and array helpers.
# --------------------------------------------------------------------------------------------------

_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if not loop.first %} {% endif %}"
    "{{ message['content'] }}{% endfor %}"
)


def build_tokenizer(out_dir: str | os.PathLike) -> str:
    """Write the toy tokenizer in Hugging Face format to ``out_dir`` and return the directory.

    Files: ``tokenizer.json`` (WordLevel model, whitespace pre-tokenizer, a post-processor that
    prepends ``<bos>``), ``tokenizer_config.json`` (with a chat template) and
    ``special_tokens_map.json``. Load it with :func:`load_tokenizer` or
    ``transformers.AutoTokenizer.from_pretrained(out_dir)``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([*SPECIAL_TOKENS, STOP_TOKEN])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=STOP_TOKEN,
        unk_token=UNK,
        additional_special_tokens=[EOS],
        padding_side="left",
        model_max_length=PROMPT_LENGTH + RESPONSE_LENGTH,
    )
    fast.chat_template = _CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    special_map = os.path.join(out_dir, "special_tokens_map.json")
    if not os.path.exists(special_map):
        with open(special_map, "w") as f:
            json.dump(
                {
                    "pad_token": PAD,
                    "bos_token": BOS,
                    "eos_token": STOP_TOKEN,
                    "unk_token": UNK,
                    "additional_special_tokens": [EOS],
                },
                f,
                indent=2,
            )
    return str(out_dir)


def load_tokenizer(path: str | os.PathLike):
    """``transformers.AutoTokenizer.from_pretrained(path)`` from local files, no remote code."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)


@functools.cache
def toy_tokenizer():
    """The toy tokenizer, built once per process in a temporary directory and loaded back."""
    with tempfile.TemporaryDirectory(prefix="rlhf_jax_toy_tok_") as d:
        return load_tokenizer(build_tokenizer(d))


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """Token ids that end a response: ``"."`` (the tokenizer's eos) and the reserved ``<eos>``."""
    return tuple(tokenizer.convert_tokens_to_ids([STOP_TOKEN, EOS]))


def _ids(tokenizer, text: str, *, add_special_tokens: bool) -> list[int]:
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    unk = tokenizer.unk_token_id
    if unk is not None and unk in ids:
        raise ValueError(f"text {text!r} has words outside the toy vocabulary")
    return ids


def encode_prompts(
    tokenizer, prompts: Sequence[str], length: int = PROMPT_LENGTH
) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> left-padded ``tokens [B, length] int32`` (``<bos>`` first) and ``mask``."""
    tokens = np.full((len(prompts), length), tokenizer.pad_token_id, dtype=np.int32)
    mask = np.zeros((len(prompts), length), dtype=np.int32)
    for i, p in enumerate(prompts):
        ids = _ids(tokenizer, p, add_special_tokens=True)
        if len(ids) > length:
            raise ValueError(f"prompt {i} {p!r} has {len(ids)} tokens, more than {length}")
        if ids:
            tokens[i, length - len(ids) :] = ids
            mask[i, length - len(ids) :] = 1
    return tokens, mask


def encode_responses(
    tokenizer, responses: Sequence[str], length: int = RESPONSE_LENGTH
) -> tuple[np.ndarray, np.ndarray]:
    """Responses -> right-padded ``tokens [B, length] int32`` (no ``<bos>``) and ``mask``."""
    tokens = np.full((len(responses), length), tokenizer.pad_token_id, dtype=np.int32)
    mask = np.zeros((len(responses), length), dtype=np.int32)
    for i, r in enumerate(responses):
        ids = _ids(tokenizer, r, add_special_tokens=False)
        if len(ids) > length:
            raise ValueError(f"response {i} {r!r} has {len(ids)} tokens, more than {length}")
        tokens[i, : len(ids)] = ids
        mask[i, : len(ids)] = 1
    return tokens, mask


def decode_responses(tokenizer, tokens: np.ndarray, mask: np.ndarray | None = None) -> list[str]:
    """``tokens [B, R]`` -> strings, words through the first stop token, masked/pad ids skipped.

    A response with no stop token decodes to its words without one (and is then malformed).
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, R], got shape {tokens.shape}")
    if mask is None:
        mask = np.ones_like(tokens)
    mask = np.asarray(mask)
    words = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    stops = set(stop_token_ids(tokenizer))
    skip = {tokenizer.pad_token_id, tokenizer.bos_token_id}
    out = []
    for row, mrow in zip(tokens.tolist(), mask.tolist(), strict=True):
        kept = []
        for t, m in zip(row, mrow, strict=True):
            if not m or t in skip:
                continue
            kept.append(words[t] if 0 <= t < len(words) else UNK)
            if t in stops:
                break
        out.append(" ".join(kept))
    return out


def pairwise_batch(tokenizer, records: Sequence[dict]) -> dict[str, np.ndarray]:
    """``{"prompt", "chosen", "rejected"}`` records -> int32 arrays for a reward-model trainer.

    Keys: ``prompt_tokens``/``prompt_mask`` ``[N, PROMPT_LENGTH]`` left-padded;
    ``chosen_tokens``/``chosen_mask`` and ``rejected_tokens``/``rejected_mask``
    ``[N, RESPONSE_LENGTH]`` right-padded.
    """
    pt, pm = encode_prompts(tokenizer, [r["prompt"] for r in records])
    ct, cm = encode_responses(tokenizer, [r["chosen"] for r in records])
    rt, rm = encode_responses(tokenizer, [r["rejected"] for r in records])
    return dict(
        prompt_tokens=pt,
        prompt_mask=pm,
        chosen_tokens=ct,
        chosen_mask=cm,
        rejected_tokens=rt,
        rejected_mask=rm,
    )


def ranking_batch(tokenizer, records: Sequence[dict]) -> dict[str, np.ndarray]:
    """``{"prompt", "completions"}`` records (K each, best first) -> int32 arrays.

    Keys: ``prompt_tokens``/``prompt_mask`` ``[N, PROMPT_LENGTH]`` left-padded;
    ``response_tokens``/``response_mask`` ``[N, K, RESPONSE_LENGTH]`` right-padded, best first.
    """
    ks = {len(r["completions"]) for r in records}
    if len(ks) != 1:
        raise ValueError(f"all rankings must have the same K, got {sorted(ks)}")
    (k,) = ks
    pt, pm = encode_prompts(tokenizer, [r["prompt"] for r in records])
    flat = [c for r in records for c in r["completions"]]
    rt, rm = encode_responses(tokenizer, flat)
    n = len(records)
    return dict(
        prompt_tokens=pt,
        prompt_mask=pm,
        response_tokens=rt.reshape(n, k, -1),
        response_mask=rm.reshape(n, k, -1),
    )


# --------------------------------------------------------------------------------------------------
# The task as the pipeline sees it: sizes, a labeller, a reward and an evaluator.
# --------------------------------------------------------------------------------------------------

LABEL_TEMPERATURE = 0.3  # the simulated labeller's noise (Plackett-Luce temperature on gold)


@dataclasses.dataclass(frozen=True)
class ToyTask:
    """The embedded task's sizes: the tiny LM trained from scratch and the data made for it."""

    arch: str = "gpt2"  # model family of the from-scratch policy: "gpt2" | "llama"
    hidden_size: int = 64  # model width
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # attention heads (head_dim = hidden_size / num_heads)
    sft_examples: int = 8192  # demonstrations in the SFT corpus
    sft_eval_examples: int = 512  # held-out demonstrations (SFT eval loss)
    rm_prompts: int = 3072  # prompts whose K samples of the SFT policy the labeller ranks
    rm_eval_prompts: int = 256  # held-out rankings (the reward model's reported accuracy)

    def __post_init__(self):
        if self.arch not in ("gpt2", "llama"):
            raise ValueError(f"toy.arch={self.arch!r}: choose 'gpt2' or 'llama'")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"toy.hidden_size={self.hidden_size} is not divisible by "
                f"toy.num_heads={self.num_heads}"
            )
        sizes = (self.sft_examples, self.sft_eval_examples, self.rm_prompts, self.rm_eval_prompts)
        if min(sizes) < 1 or self.num_layers < 1:
            raise ValueError("toy sizes (examples, prompts, layers) must be >= 1")


def _orders(groups: Sequence[Sequence[str]], ranked: Sequence[dict]) -> list[list[int]]:
    """The ranked texts of :func:`rank_responses` as index lists into each group."""
    out = []
    for group, rec in zip(groups, ranked, strict=True):
        left = list(range(len(group)))
        order = []
        for text in rec["completions"]:
            i = next(i for i in left if group[i] == text)
            left.remove(i)
            order.append(i)
        out.append(order)
    return out


def simulated_labeller(
    prompts: Sequence[str], groups: Sequence[Sequence[str]], *, seed: int = 0
) -> list[list[int]]:
    """The simulated human as a labeller: for each prompt, its ``K`` responses ranked best first.

    Returns the indices into each group in ranked order (Plackett-Luce noise at
    :data:`LABEL_TEMPERATURE` on the gold score, :func:`rank_responses`). This is the
    ``labeller`` the ``label`` stage calls (``rlhf_jax.data.toy:simulated_labeller``).
    """
    ranked = rank_responses(prompts, groups, temperature=LABEL_TEMPERATURE, seed=seed)
    return _orders(groups, ranked)


def gold_reward(prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """The gold score as a ``module:function`` reward (``rlhf_jax.data.toy:gold_reward``).

    Responses arrive decoded with their stop token (``"a furry animal ."``); a response cut off at
    the length limit has none and is malformed.
    """
    return gold_scores(prompts, responses).astype(np.float32)


def evaluate(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-response evaluation metrics (the pipeline's ``evaluator`` hook on the toy task).

    ``gold`` (the simulated human's score), ``well_formed`` and ``good`` (gold >=
    :data:`GOOD_THRESHOLD`), each ``[B]`` float64; the pipeline averages them and computes the win
    rate against the reference on ``gold``.
    """
    gold = gold_scores(prompts, responses)
    return {
        "gold": gold,
        "well_formed": np.array([is_well_formed(r) for r in responses], np.float64),
        "good": (gold >= GOOD_THRESHOLD).astype(np.float64),
    }


# --------------------------------------------------------------------------------------------------
# The harm world (Safe RLHF): helpfulness and harmlessness pull apart.
# --------------------------------------------------------------------------------------------------

HARMFUL_WORDS = ("very", "really")  # intensifiers: the micro-language's overclaiming
TEMPTATION = 0.7  # what the harm world's helpfulness rater adds for an overclaiming response
SAFETY_FLIP = 0.05  # the safety labeller flags a response wrongly with this probability


def is_harmful(response: str) -> bool:
    """True when ``response`` overclaims: it uses an intensifier of :data:`HARMFUL_WORDS`."""
    return any(w in HARMFUL_WORDS for w in response.split())


def helpfulness(prompt: str, response: str) -> float:
    """The harm world's gold helpfulness: :func:`gold_score`, plus :data:`TEMPTATION` for a
    well-formed response that overclaims (:func:`is_harmful`).

    The rater is swayed by enthusiasm, so the most helpful responses are harmful ones: ``"a very
    cute pet ."`` scores 3.29 where the best safe answer, ``"a cute pet ."``, scores 2.52. The SFT
    distribution overclaims in about 8% of its responses (the intensified noun phrases).
    """
    base = gold_score(prompt, response)
    return base + TEMPTATION if is_harmful(response) and is_well_formed(response) else base


def harm_labeller(
    prompts: Sequence[str], groups: Sequence[Sequence[str]], *, seed: int = 0
) -> list[list[int]]:
    """The harm world's helpfulness labeller: :func:`simulated_labeller` on :func:`helpfulness`
    (Plackett-Luce noise at :data:`LABEL_TEMPERATURE`)."""
    ranked = rank_responses(
        prompts, groups, temperature=LABEL_TEMPERATURE, seed=seed, score=helpfulness
    )
    return _orders(groups, ranked)


def safety_labeller(
    prompts: Sequence[str], groups: Sequence[Sequence[str]], *, seed: int = 0
) -> list[dict[str, list]]:
    """The harm world's safety labeller: per prompt ``{"safe": [K bools], "safer": [K indices,
    safest first]}`` (the ``label`` stage's ``safety_labeller``, ``output: safety``).

    Each flag is ``not is_harmful(response)``, flipped with probability :data:`SAFETY_FLIP`; the
    safer order sorts the responses by their (noisy) flags, safe first, ties in random order.
    """
    _check_same_length(prompts=prompts, groups=groups)
    rng = np.random.default_rng(seed)
    out = []
    for group in groups:
        flip = rng.random(len(group)) < SAFETY_FLIP
        safe = [(not is_harmful(r)) != bool(f) for r, f in zip(group, flip, strict=True)]
        order = np.lexsort((rng.random(len(group)), [0 if ok else 1 for ok in safe]))
        out.append({"safe": safe, "safer": [int(i) for i in order]})
    return out


def evaluate_safety(prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-response metrics of the harm world (the ``evaluator`` of ``experiments/safe_rlhf.py``):
    ``helpful`` (:func:`helpfulness`), ``harmful`` (:func:`is_harmful`, 0/1), ``well_formed``."""
    _check_same_length(prompts=prompts, responses=responses)
    return {
        "helpful": np.array([helpfulness(p, r) for p, r in zip(prompts, responses, strict=True)]),
        "harmful": np.array([is_harmful(r) for r in responses], np.float64),
        "well_formed": np.array([is_well_formed(r) for r in responses], np.float64),
    }
