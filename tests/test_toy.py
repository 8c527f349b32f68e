"""Tests of the embedded toy task: tokenizer, grammar, gold preference, labelers, SFT corpus."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from rlhf_jax.data import toy


@pytest.fixture(scope="module")
def tok():
    return toy.toy_tokenizer()


# --- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_saved_in_hf_format_and_loaded_by_autotokenizer(tmp_path):
    out = toy.build_tokenizer(tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "tok" / name).is_file(), name
    special = json.loads((tmp_path / "tok" / "special_tokens_map.json").read_text())
    assert special["eos_token"] == "." and special["pad_token"] == "<pad>"
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert len(tok) == len(toy.VOCAB) < 256
    assert tok.convert_ids_to_tokens(list(range(len(tok)))) == list(toy.VOCAB)
    assert (tok.pad_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 3)
    assert tok.eos_token_id == 4 == tok.convert_tokens_to_ids(".")
    assert toy.stop_token_ids(tok) == (4, 2)
    dog = [tok.convert_tokens_to_ids(w) for w in ("a", "dog", "is")]
    assert tok("a dog is")["input_ids"] == [1, *dog]
    assert tok("a dog is", add_special_tokens=False)["input_ids"] == dog
    # "." splits off a word even without a space, and unknown words map to <unk>.
    ids = tok("a furry animal.", add_special_tokens=False)["input_ids"]
    assert ids == tok("a furry animal .", add_special_tokens=False)["input_ids"] and ids[-1] == 4
    assert tok("a zebra is", add_special_tokens=False)["input_ids"][1] == 3
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "a dog is"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<bos>a dog is"
    assert tok(rendered, add_special_tokens=False)["input_ids"] == [1, *dog]


def test_encode_and_decode(tok):
    pt, pm = toy.encode_prompts(tok, ["a dog is", "an apple seems"], length=5)
    assert pt.dtype == np.int32 and pt.shape == (2, 5)
    np.testing.assert_array_equal(pm, [[0, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert pt[0, 0] == tok.pad_token_id and pt[0, 1] == tok.bos_token_id
    rt, rm = toy.encode_responses(tok, ["a furry animal .", "cute ."])
    assert rt.shape == (2, toy.RESPONSE_LENGTH)
    np.testing.assert_array_equal(rm.sum(1), [4, 2])
    assert rm[0, :4].all() and not rm[0, 4:].any()
    assert toy.decode_responses(tok, rt, rm) == ["a furry animal .", "cute ."]
    # Decoding stops at the first stop token; masked positions and pads are skipped.
    stop, furry, cute = (tok.convert_tokens_to_ids(w) for w in (".", "furry", "cute"))
    tokens = np.array([[cute, stop, furry, stop], [furry, cute, furry, cute]])
    mask = np.array([[1, 1, 1, 1], [1, 0, 1, 1]])
    assert toy.decode_responses(tok, tokens, mask) == ["cute .", "furry furry cute"]
    eos = tok.convert_tokens_to_ids("<eos>")
    assert toy.decode_responses(tok, np.array([[cute, eos, cute]])) == ["cute <eos>"]
    assert not toy.is_well_formed("cute <eos>")
    with pytest.raises(ValueError, match="more than 3"):
        toy.encode_prompts(tok, ["a dog is"], length=3)
    with pytest.raises(ValueError, match="outside the toy vocabulary"):
        toy.encode_responses(tok, ["a zebra ."])


# --- grammar and gold -----------------------------------------------------------------------------

WELL_FORMED = [
    "a furry animal .",
    "an animal .",
    "a very friendly pet .",
    "an ugly furry animal .",
    "a furry and friendly animal .",
    "a really cute and very playful creature .",
    "cute .",
    "shiny and useful .",
    "very useful .",
]
MALFORMED = [
    "a furry animal",  # no stop token
    "an furry animal .",  # wrong article
    "a animal .",  # wrong article
    "a furry furry animal .",  # stutter
    "a furry and animal .",  # dangling "and"
    "a furry animal and .",
    "animal furry a .",  # word salad
    "furry cute .",  # stacked adjectives without a noun
    "a big furry cute animal .",  # three adjectives
    "a furry . animal .",  # stop in the middle
    ".",
    "",
    "a very animal .",  # adverb without adjective
    "the furry animal .",  # prompt determiner in a response
    "a furry animal . .",
]


@pytest.mark.parametrize("response", WELL_FORMED)
def test_well_formed(response):
    assert toy.is_well_formed(response)
    assert toy.gold_score("a dog is", response) > -3.3


@pytest.mark.parametrize("response", MALFORMED)
def test_malformed(response):
    assert not toy.is_well_formed(response)
    assert toy.gold_score("a dog is", response) < -3.7


_WORDS = sorted(toy._COMPLETION_WORDS)


@settings(max_examples=300, deadline=None)
@given(
    subject=st.sampled_from(toy.SUBJECTS),
    words=st.lists(st.sampled_from(_WORDS), min_size=0, max_size=9),
)
def test_gold_separates_malformed_from_well_formed(tok, subject, words):
    response = " ".join(words)
    g = toy.gold_score(f"the {subject} is", response)
    if toy.is_well_formed(response):
        assert -3.18 <= g <= 2.7
        assert len(words) <= 8
        tokens, mask = toy.encode_responses(tok, [response])
        assert toy.decode_responses(tok, tokens, mask) == [response]
    else:
        assert g <= -3.73


def test_gold_hand_computed_value():
    def cost(response):
        return sum(0.004 * math.log(2 + toy.VOCAB.index(w)) for w in response.split())

    # fit(animal|dog)=1, fit(furry|dog)=1, sentiment(furry)=0.3, 4 tokens.
    expected = 1.0 + 1.0 + 0.8 * 0.3 - 0.03 * 4 - cost("a furry animal .")
    assert toy.gold_score("a dog is", "a furry animal .") == pytest.approx(expected, abs=1e-12)
    # "very" multiplies sentiment by 1.4; mean over two adjectives; clipped at 1.
    s = 0.5 * (0.85 * 1.4 + 0.8)
    expected = 1.0 + 0.95 + 0.8 * min(s, 1.0) - 0.03 * 7 - cost("a very cute and friendly pet .")
    assert toy.gold_score("my cat looks", "a very cute and friendly pet .") == pytest.approx(
        expected
    )


def test_gold_prefers_fit_sentiment_and_concision():
    g = toy.gold_score
    assert g("a dog is", "a furry animal .") > g("a dog is", "a metal tool .")  # fit
    assert g("a hammer is", "a metal tool .") > g("a hammer is", "a furry animal .")
    assert g("the cat looks", "a friendly animal .") > g("the cat looks", "a lazy animal .")
    assert g("the cat looks", "a cute pet .") > g("the cat looks", "a cute and big pet .")
    assert g("the cat looks", "a cute pet .") > g("the cat looks", "cute .")  # informative
    with pytest.raises(ValueError, match="names no subject"):
        g("a zebra is", "a furry animal .")


def test_gold_win_rate_counts_ties_half():
    prompts = ["a dog is"] * 4
    a = ["a furry animal .", "a metal tool .", "cute .", "a furry animal ."]
    b = ["a metal tool .", "a furry animal .", "cute .", "a furry animal"]
    assert toy.gold_win_rate(prompts, a, b) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert toy.well_formed_share(a + b) == pytest.approx(7 / 8)
    with pytest.raises(ValueError, match="same length"):
        toy.gold_win_rate(prompts, a, b[:3])


# --- SFT corpus -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
    recs = toy.sft_records(4000, seed=0)
    prompts = [r["prompt"] for r in recs]
    responses = [r["completion"] for r in recs]
    return prompts, responses, toy.gold_scores(prompts, responses)


def test_sft_corpus_is_mediocre_and_improvable(corpus):
    prompts, responses, gold = corpus
    good = gold >= toy.GOOD_THRESHOLD
    assert 0.08 <= good.mean() <= 0.2  # best responses are reasonably likely
    assert 0.4 <= gold.mean() <= 1.0  # a mediocre mean ...
    assert gold.max() > 2.4  # ... far below the best
    assert 0.92 <= toy.well_formed_share(responses) <= 0.98  # a few malformed
    assert max(len(r.split()) for r in responses) <= toy.RESPONSE_LENGTH - 1
    wf = np.array([toy.is_well_formed(r) for r in responses])
    assert gold[wf].min() >= -3.18 and gold[~wf].max() <= -3.73
    assert len(set(prompts)) == len(toy.all_prompts()) == 99
    # Good responses are fitting, positive noun phrases.
    for p, r in zip(np.array(prompts)[good], np.array(responses)[good], strict=True):
        parse = toy.parse_response(r)
        assert parse is not None and parse.noun is not None, r
        subject = toy.prompt_subject(p)
        assert toy._fit(toy._NOUN_FIT[parse.noun], subject) > 0.5, (p, r)
        assert parse.modifiers, r
        assert sum(toy._ADJECTIVES[adj][0] for _, adj in parse.modifiers) > 0, r
        for _, adj in parse.modifiers:
            assert toy._ADJECTIVES[adj][0] >= 0 and toy._fit(toy._ADJECTIVES[adj][1], subject) > 0
    # Ties are rare: distinct word multisets of one prompt get distinct scores.
    seen: dict[tuple[str, float], set] = {}
    for p, r, s in zip(prompts, responses, gold, strict=True):
        seen.setdefault((p, round(float(s), 9)), set()).add(tuple(sorted(r.split())))
    assert sum(len(v) > 1 for v in seen.values()) / len(seen) < 0.01


def test_sft_corpus_deterministic_by_seed():
    assert toy.sft_records(50, seed=3) == toy.sft_records(50, seed=3)
    assert toy.sft_records(50, seed=3) != toy.sft_records(50, seed=4)


def test_quickstart_target_is_reachable(corpus):
    """A best-of-16 policy (KL to SFT <= log 16 - 15/16 = 1.8 nats) beats SFT >= 80% of the time."""
    rng = np.random.default_rng(1)
    prompts = toy.sample_prompts(300, seed=2)
    best = []
    for p in prompts:
        cands = [toy.sample_response(rng, p) for _ in range(16)]
        best.append(max(cands, key=lambda r: toy.gold_score(p, r)))
    sft = [toy.sample_response(rng, p) for p in prompts]
    assert toy.gold_win_rate(prompts, best, sft) >= 0.85
    assert toy.well_formed_share(best) >= 0.99


# --- simulated labelers ---------------------------------------------------------------------------


def test_label_pairs_bradley_terry():
    prompts = ["a dog is"] * 4000
    a, b = ["a furry animal ."] * 4000, ["a sleepy creature ."] * 4000
    d = toy.gold_score("a dog is", a[0]) - toy.gold_score("a dog is", b[0])
    for temperature in (0.2, 1.0):
        recs = toy.label_pairs(prompts, a, b, temperature=temperature, seed=0)
        rate = np.mean([r["chosen"] == a[0] for r in recs])
        p = 1 / (1 + math.exp(-d / temperature))
        assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / 4000) + 1e-9, (temperature, rate, p)
    exact = toy.label_pairs(prompts[:50], b[:50], a[:50], temperature=0.0, seed=0)
    assert all(r["chosen"] == a[0] and r["rejected"] == b[0] for r in exact)
    assert toy.label_pairs(prompts[:9], a[:9], b[:9], temperature=1.0, seed=5) == toy.label_pairs(
        prompts[:9], a[:9], b[:9], temperature=1.0, seed=5
    )
    with pytest.raises(ValueError, match="temperature"):
        toy.label_pairs(prompts[:1], a[:1], b[:1], temperature=-1.0, seed=0)


def test_rankings_plackett_luce():
    group = ["a furry animal .", "a sleepy creature .", "a metal tool .", "furry animal"]
    gold = [toy.gold_score("a dog is", r) for r in group]
    assert gold == sorted(gold, reverse=True)
    shuffled = [group[i] for i in (2, 0, 3, 1)]
    (rec,) = toy.rank_responses(["a dog is"], [shuffled], temperature=0.0, seed=0)
    assert rec["completions"] == group
    # K = 2 reduces to Bradley-Terry.
    n, t = 3000, 0.5
    recs = toy.rank_responses(["a dog is"] * n, [group[1::-1]] * n, temperature=t, seed=1)
    rate = np.mean([r["completions"][0] == group[0] for r in recs])
    p = 1 / (1 + math.exp(-(gold[0] - gold[1]) / t))
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_record_builders_and_batches(tok):
    prefs = toy.preference_records(6, seed=0, temperature=0.0)
    for r in prefs:
        assert r["chosen"] != r["rejected"]
        assert toy.gold_score(r["prompt"], r["chosen"]) >= toy.gold_score(
            r["prompt"], r["rejected"]
        )
    batch = toy.pairwise_batch(tok, prefs)
    assert {k: v.shape for k, v in batch.items()} == {
        "prompt_tokens": (6, 4),
        "prompt_mask": (6, 4),
        "chosen_tokens": (6, 10),
        "chosen_mask": (6, 10),
        "rejected_tokens": (6, 10),
        "rejected_mask": (6, 10),
    }
    assert all(v.dtype == np.int32 for v in batch.values())
    assert toy.decode_responses(tok, batch["chosen_tokens"], batch["chosen_mask"]) == [
        r["chosen"] for r in prefs
    ]
    ranks = toy.ranking_records(5, 4, seed=1, temperature=0.0)
    rb = toy.ranking_batch(tok, ranks)
    assert rb["response_tokens"].shape == (5, 4, 10) == rb["response_mask"].shape
    for i, r in enumerate(ranks):
        assert len(set(r["completions"])) == 4
        assert toy.decode_responses(tok, rb["response_tokens"][i]) == r["completions"]
    assert toy.ranking_records(5, 4, seed=1) == toy.ranking_records(5, 4, seed=1)
    with pytest.raises(ValueError, match="k >= 2"):
        toy.ranking_records(2, 1, seed=0)


def test_gold_scoring_is_fast(corpus):
    """The simulated human scores every evaluation sample of the quickstart, so scoring must
    stay cheap: 4000 (prompt, response) pairs take about 0.01 s of CPU. The bound is 100 times
    that, in CPU time of this process (not wall time, which other processes on a shared machine
    stretch), so it fails only when scoring turns pathological (re-parsing the grammar tables per
    call, a quadratic scan), never from a busy machine. The scores must also be the per-pair
    ones, so speed cannot come from skipping work."""
    import time

    prompts, responses, scores = corpus
    start = time.process_time()
    fresh = toy.gold_scores(prompts, responses)
    seconds = time.process_time() - start
    assert seconds < 1.0, f"4000 gold scores took {seconds:.2f} s of CPU (expected ~0.01 s)"
    assert fresh.shape == (4000,) and fresh.dtype == np.float64
    np.testing.assert_array_equal(fresh, scores)
    every_50th = [toy.gold_score(p, r) for p, r in zip(prompts[::50], responses[::50], strict=True)]
    np.testing.assert_array_equal(fresh[::50], every_50th)


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "sft.jsonl"
    records = toy.sft_records(5, seed=0)
    assert toy.write_jsonl(path, records) == str(path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == records
    with pytest.raises(TypeError):
        toy.write_jsonl(tmp_path / "bad.jsonl", [*records, {"prompt": object()}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft.jsonl"]  # nothing half-written


def test_harm_world_tempts_helpfulness_and_labels_safety_with_noise():
    p = "a dog is"
    # the rater adds the temptation to a well-formed overclaiming response only
    assert toy.helpfulness(p, "a very cute pet .") == pytest.approx(
        toy.gold_score(p, "a very cute pet .") + toy.TEMPTATION
    )
    assert toy.helpfulness(p, "a cute pet .") == toy.gold_score(p, "a cute pet .")
    assert toy.helpfulness(p, "very very .") == toy.gold_score(p, "very very .")  # malformed
    assert toy.helpfulness(p, "a very cute pet .") > toy.helpfulness(p, "a cute pet .") + 0.5
    assert toy.is_harmful("a really friendly animal .") and not toy.is_harmful("a quite cute pet .")
    # the safety labeller: 5% of flags wrong, and each group ordered by its flags, safe first
    rng = np.random.default_rng(0)
    prompts = toy.sample_prompts(1000, seed=3)
    groups = [[toy.sample_response(rng, q) for _ in range(4)] for q in prompts]
    labels = toy.safety_labeller(prompts, groups, seed=1)
    wrong = total = 0
    for group, lab in zip(groups, labels, strict=True):
        assert sorted(lab["safer"]) == [0, 1, 2, 3]
        flags = [lab["safe"][i] for i in lab["safer"]]
        assert flags == sorted(flags, reverse=True)  # safe (True) before unsafe
        wrong += sum(s == toy.is_harmful(r) for s, r in zip(lab["safe"], group, strict=True))
        total += len(group)
    assert 0.035 < wrong / total < 0.065, wrong / total
    # the helpfulness labeller ranks by helpfulness: the harmful better answer usually wins
    order = toy.harm_labeller([p] * 200, [["a cute pet .", "a very cute pet ."]] * 200, seed=2)
    assert np.mean([o[0] == 1 for o in order]) > 0.8
