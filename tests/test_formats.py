"""Tests of rlhf_jax.data.formats: each source and row kind, bad inputs, shuffling and the cursor."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax.data import formats as F
from rlhf_jax.data import toy


@pytest.fixture(scope="module")
def tok():
    return toy.toy_tokenizer()


@pytest.fixture(scope="module")
def tok_no_template(tmp_path_factory):
    t = toy.load_tokenizer(toy.build_tokenizer(tmp_path_factory.mktemp("tok")))
    t.chat_template = None
    return t


def write_jsonl(path, rows):
    return toy.write_jsonl(path, rows)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


SFT = toy.sft_records(24, seed=0)
PREFS = toy.preference_records(12, seed=1, temperature=0.0)
RANKS = toy.ranking_records(6, 3, seed=2, temperature=0.0)


def assert_arrays_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# --- each source and kind -------------------------------------------------------------------------


def test_prompt_only_jsonl_text_and_messages(tmp_path, tok):
    prompts = [r["prompt"] for r in SFT]
    cfg = F.DataConfig("prompt", max_prompt_length=5)
    text = F.load_dataset(
        write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts]), tok, cfg
    )
    expected = toy.encode_prompts(tok, prompts, length=5)
    np.testing.assert_array_equal(text.arrays["prompt_tokens"], expected[0])
    np.testing.assert_array_equal(text.arrays["prompt_mask"], expected[1])
    assert text.arrays["prompt_tokens"].dtype == np.int32 and len(text) == 24
    # Conversational: a trailing assistant turn is dropped from a prompt-only row.
    rows = [{"messages": user(p) + assistant("x .")} for p in prompts]
    conv = F.load_dataset(write_jsonl(tmp_path / "m.jsonl", rows), tok, cfg)
    assert_arrays_equal(text.arrays, conv.arrays)


def test_completion_text_messages_and_eos(tmp_path, tok):
    cfg = F.DataConfig("completion", max_prompt_length=4, max_completion_length=10)
    ds = F.load_dataset(write_jsonl(tmp_path / "c.jsonl", SFT), tok, cfg)
    pt, pm = toy.encode_prompts(tok, [r["prompt"] for r in SFT])
    completions = [r["completion"] for r in SFT]
    # append_eos adds "." (the toy EOS) only where a completion does not already end with it.
    ct, cm = toy.encode_responses(tok, [c if c.endswith(".") else c + " ." for c in completions])
    assert_arrays_equal(
        ds.arrays,
        {"prompt_tokens": pt, "prompt_mask": pm, "completion_tokens": ct, "completion_mask": cm},
    )
    for rows in (
        [{"messages": user(r["prompt"]) + assistant(r["completion"])} for r in SFT],
        [{"prompt": user(r["prompt"]), "completion": assistant(r["completion"])} for r in SFT],
    ):
        conv = F.load_dataset(rows, tok, cfg)
        assert_arrays_equal(ds.arrays, conv.arrays)
    no_eos = F.load_dataset(
        [{"prompt": "a dog is", "completion": "cute"}],
        tok,
        F.DataConfig("completion", 4, 10, append_eos=False),
    )
    assert no_eos.arrays["completion_mask"].sum() == 1


def test_preference_parquet_with_margin_and_conversational(tmp_path, tok):
    rows = [dict(r, margin=float(i) / 4) for i, r in enumerate(PREFS)]
    cfg = F.DataConfig("preference", max_prompt_length=4, max_completion_length=10)
    ds = F.load_dataset(write_parquet(tmp_path / "p.parquet", rows), tok, cfg)
    expected = toy.pairwise_batch(tok, PREFS)
    margin = ds.arrays.pop("margin")
    assert_arrays_equal(ds.arrays, expected)
    np.testing.assert_array_equal(margin, np.arange(12, dtype=np.float32) / 4)
    rows = [dict(r, margin=np.float32(1.5)) for r in PREFS]  # numpy scalars are numbers too
    assert F.load_dataset(rows, tok, cfg).arrays["margin"].tolist() == [1.5] * 12
    conv = [
        {
            "prompt": user(r["prompt"]),
            "chosen": assistant(r["chosen"]),
            "rejected": assistant(r["rejected"]),
        }
        for r in PREFS
    ]
    assert_arrays_equal(F.load_dataset(conv, tok, cfg).arrays, expected)


def test_ranking_json_array_and_hf_dataset_like(tmp_path, tok):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(RANKS, indent=1))
    cfg = F.DataConfig("ranking", 4, 10, num_completions=3)
    ds = F.load_dataset(path, tok, cfg)
    assert_arrays_equal(ds.arrays, toy.ranking_batch(tok, RANKS))

    class FakeHFDataset:  # what datasets.Dataset offers: column_names, len, row dicts
        column_names = ["prompt", "completions"]

        def __len__(self):
            return len(RANKS)

        def __iter__(self):
            return iter(RANKS)

    assert_arrays_equal(F.load_dataset(FakeHFDataset(), tok, cfg).arrays, ds.arrays)


def test_real_hf_dataset(tok):
    datasets = pytest.importorskip("datasets")
    hf = datasets.Dataset.from_list(PREFS)
    cfg = F.DataConfig("preference", 4, 10)
    assert_arrays_equal(F.load_dataset(hf, tok, cfg).arrays, toy.pairwise_batch(tok, PREFS))
    with pytest.raises(
        F.DataError, match=r"DatasetDict>: a DatasetDict; pick a split, e.g. ds\['train'\]"
    ):
        F.load_dataset(datasets.DatasetDict({"train": hf}), tok, cfg)
    with pytest.raises(F.DataError, match="streaming .* without streaming=True"):
        F.load_dataset(hf.to_iterable_dataset(), tok, cfg)


# --- lengths and skipping -------------------------------------------------------------------------


def test_overlong_filter_truncate_and_skip_counts(tok):
    rows = [
        {"prompt": "a dog is", "completion": "a furry animal ."},
        {"prompt": "a dog is a dog is", "completion": "cute ."},  # prompt of 7 tokens
        {"prompt": "a cat is", "completion": "a very cute and very friendly pet ."},  # 8 tokens
        {"prompt": "a cat is"},  # malformed: no completion
    ]
    base = dict(kind="completion", max_prompt_length=4, max_completion_length=5, on_error="skip")
    ds = F.load_dataset(rows, tok, F.DataConfig(**base, overlong="filter"))
    assert (ds.stats.rows_read, ds.stats.rows_kept, ds.stats.filtered_overlong) == (4, 1, 2)
    assert ds.stats.skipped_malformed == 1
    assert "row 4, field 'completion': missing field" in ds.stats.errors[0]
    ds = F.load_dataset(rows, tok, F.DataConfig(**base, overlong="truncate"))
    assert (ds.stats.rows_kept, ds.stats.truncated_prompts, ds.stats.truncated_completions) == (
        3,
        1,
        1,
    )
    assert "3/4 rows kept" in ds.stats.summary()
    unk = F.load_dataset(
        [{"prompt": "a zebra is"}, {"prompt": "a dog is"}], tok, F.DataConfig("prompt", 4)
    )
    assert (unk.stats.rows_kept, unk.stats.rows_with_unknown_tokens) == (2, 1)
    # Prompts keep their last tokens, completions their first.
    ids = tok("a dog is a dog is")["input_ids"]
    np.testing.assert_array_equal(ds.arrays["prompt_tokens"][1], ids[-4:])
    want = tok("a very cute and very friendly pet .", add_special_tokens=False)["input_ids"][:5]
    np.testing.assert_array_equal(ds.arrays["completion_tokens"][2], want)
    assert ds.arrays["completion_mask"][2].all()


# --- bad inputs -----------------------------------------------------------------------------------

_C = dict(kind="completion", max_prompt_length=4, max_completion_length=10)
_P = dict(kind="preference", max_prompt_length=4, max_completion_length=10)
_R = dict(kind="ranking", max_prompt_length=4, max_completion_length=10, num_completions=4)
_OK = {"prompt": "a dog is", "completion": "a furry animal ."}
_OKP = {"prompt": "a dog is", "chosen": "cute .", "rejected": "bad ."}

# (id, file name, content: rows (JSON lines) or raw bytes, config, expected message regex)
BAD_INPUTS = [
    (
        "missing field",
        "d.jsonl",
        [_OK, {"prompt": "a dog is"}],
        _C,
        r"d\.jsonl, line 2, field 'completion': missing field 'completion'",
    ),
    (
        "wrong type",
        "d.jsonl",
        [{"prompt": 7, "completion": "cute ."}],
        _C,
        r"line 1, field 'prompt': must be a string or a list of messages, got int",
    ),
    (
        "empty prompt",
        "d.jsonl",
        [_OK, _OK, {"prompt": "  ", "completion": "cute ."}],
        _C,
        r"line 3, field 'prompt': is empty",
    ),
    (
        "prompt longer than max",
        "d.jsonl",
        [{"prompt": "a dog is a dog", "completion": "cute ."}],
        dict(_C, overlong="error"),
        r"line 1, field 'prompt': has 6 tokens, more than max_prompt_length=4",
    ),
    (
        "completion longer than max",
        "d.jsonl",
        [_OK],
        dict(_C, max_completion_length=3, overlong="error"),
        r"line 1, field 'completion': has 4 tokens, more than max_completion_length=3",
    ),
    (
        "non-UTF-8 line",
        "d.jsonl",
        b'{"prompt": "a dog is", "completion": "cute ."}\n{"prompt": "a \xff dog"}\n',
        _C,
        r"d\.jsonl, line 2: not UTF-8 text",
    ),
    (
        "invalid JSON line",
        "d.jsonl",
        b'{"prompt": "a dog is", "completion": "cute ."}\n\n{"prompt": \n',
        _C,
        r"d\.jsonl, line 3: invalid JSON",
    ),
    (
        "ranking of the wrong length",
        "d.jsonl",
        [{"prompt": "a dog is", "completions": ["a .", "b .", "c ."]}],
        _R,
        r"line 1, field 'completions': has 3 completions but num_completions \(K\) is 4",
    ),
    (
        "ranking not a list",
        "d.jsonl",
        [{"prompt": "a dog is", "completions": "cute ."}],
        _R,
        r"field 'completions': must be a list ranked best to worst, got str",
    ),
    ("empty file", "d.jsonl", b"\n  \n", _C, r"d\.jsonl: the file is empty"),
    ("unknown format", "d.csv", b"prompt,completion\n", _C, r"d\.csv: unknown data format '\.csv'"),
    (
        "messages with a bad role",
        "d.jsonl",
        [{"prompt": [{"role": "robot", "content": "a dog is"}], "completion": assistant("cute .")}],
        _C,
        r"line 1, field 'prompt\[0\]\.role': must be one of \('system', 'user', 'assistant', 'tool'\), got 'robot'",
    ),
    (
        "message content not a string",
        "d.jsonl",
        [{"messages": [{"role": "user", "content": 3}]}],
        _C,
        r"field 'messages\[0\]\.content': must be a string, got int",
    ),
    (
        "messages not ending with the assistant",
        "d.jsonl",
        [{"messages": user("a dog is") + user("hi")}],
        _C,
        r"field 'messages\[1\]\.role': the last message must be the assistant's completion, got 'user'",
    ),
    (
        "completion message not from the assistant",
        "d.jsonl",
        [{"prompt": user("a dog is"), "completion": user("cute .")}],
        _C,
        r"field 'completion': completion messages must have role 'assistant'",
    ),
    (
        "text prompt with message completion",
        "d.jsonl",
        [dict(_OKP, chosen=assistant("cute ."))],
        _P,
        r"field 'chosen': is a list of messages but the prompt is plain text",
    ),
    (
        "prompt messages all empty",
        "d.jsonl",
        [{"prompt": user(" "), "completion": assistant("cute .")}],
        _C,
        r"line 1, field 'prompt': has only empty message contents",
    ),
    (
        "messages without a prompt turn",
        "d.jsonl",
        [{"messages": assistant("cute .")}],
        dict(_C, kind="prompt"),
        r"line 1, field 'messages': has no prompt turn before the assistant's message",
    ),
    (
        "row not an object",
        "d.jsonl",
        [_OK, ["a dog is", "cute ."]],
        _C,
        r"line 2: a row must be a JSON object, got list",
    ),
    (
        "margin not a number",
        "d.jsonl",
        [dict(_OKP, margin="big")],
        _P,
        r"line 1, field 'margin': must be a number, got str",
    ),
    (
        "margin not finite",
        "d.jsonl",
        b'{"prompt": "a dog is", "chosen": "a .", "rejected": "b .", "margin": NaN}\n',
        _P,
        r"field 'margin': must be finite, got nan",
    ),
    (
        "margin missing in a later row",
        "d.jsonl",
        [dict(_OKP, margin=1.0), _OKP],
        _P,
        r"line 2, field 'margin': is missing but earlier rows have margins",
    ),
    (
        "tokenizer/model vocabulary mismatch",
        "d.jsonl",
        [_OK],
        dict(_C, vocab_size=50),
        r"tokenizer/model vocabulary mismatch: the tokenizer has 69 tokens but the model's vocab_size is 50",
    ),
    (
        "parquet row missing a column value",
        "d.parquet",
        [_OKP, dict(_OKP, rejected=None)],
        _P,
        r"d\.parquet, row 2, field 'rejected': is null; every row needs a value here",
    ),
    (
        "corrupt parquet",
        "d.parquet",
        b"PAR1 this is not parquet",
        _P,
        r"d\.parquet: cannot read as Parquet",
    ),
    ("missing file", None, None, _C, r"nope\.jsonl: no such file"),
    (
        "unknown word",
        "d.jsonl",
        [_OK, {"prompt": "a zebra is", "completion": "cute ."}],
        dict(_C, unknown_tokens="error"),
        r"line 2, field 'prompt': 'a zebra is' has text the tokenizer does not know \(\['zebra'\] encode to '<unk>'\)",
    ),
    (
        "JSON array element",
        "d.json",
        json.dumps([_OK, {"prompt": "a dog is", "completion": 5}]).encode(),
        _C,
        r"d\.json, row 2, field 'completion': must be a string or a list of messages, got int",
    ),
    (
        "every row skipped",
        "d.jsonl",
        [{"prompt": 1}, {"prompt": 2}],
        dict(_C, on_error="skip"),
        r"d\.jsonl: no usable rows \(0/2 rows kept; .*2 malformed skipped.*\); the first "
        r"skipped: line 1, field 'prompt': must be a string",
    ),
]


def test_degenerate_pairs_are_counted_and_dropped_kept_or_errors(tok):
    rows = [
        {"prompt": "a dog is", "chosen": "a cat .", "rejected": "cute ."},
        {"prompt": "a dog is", "chosen": "cute .", "rejected": "cute ."},
        {"prompt": "a cat is", "chosen": "a cat .", "rejected": "a cat ."},
        # different text, the same first 3 tokens: identical once truncated
        {"prompt": "a cat is", "chosen": "a cute pet .", "rejected": "a cute pet animal ."},
    ]
    base = dict(kind="preference", max_prompt_length=4, max_completion_length=3)
    ds = F.load_dataset(rows, tok, F.DataConfig(**base, overlong="truncate"))
    assert (ds.stats.rows_read, ds.stats.rows_kept, ds.stats.degenerate_pairs) == (4, 1, 3)
    assert len(ds) == 1 and ds.stats.truncated_completions == 1
    assert "3 degenerate pairs (chosen == rejected) dropped" in ds.stats.summary()
    keep = F.DataConfig(**base, degenerate_pairs="keep")  # overlong="filter": row 4 filtered
    kept = F.load_dataset(rows, tok, keep)
    assert (kept.stats.rows_kept, kept.stats.degenerate_pairs, len(kept)) == (3, 2, 3)
    assert "2 degenerate pairs (chosen == rejected) kept" in kept.stats.summary()
    with pytest.raises(F.DataError, match=r"row 2, field 'rejected': is the same as 'chosen'"):
        F.load_dataset(rows, tok, F.DataConfig(**base, degenerate_pairs="error"))
    skip = F.DataConfig(**base, degenerate_pairs="error", on_error="skip")
    assert F.load_dataset(rows, tok, skip).stats.skipped_malformed == 2
    with pytest.raises(F.DataError, match=r"no usable rows \(0/2 rows kept; .* 2 degenerate"):
        F.load_dataset(rows[1:3], tok, F.DataConfig(**base))
    with pytest.raises(ValueError, match="degenerate_pairs"):
        F.DataConfig(**base, degenerate_pairs="ignore")


def test_one_summary_line_per_dataset(tok):
    rows = [
        {"prompt": "a dog is", "completion": "a furry animal ."},
        {"prompt": "a dog is a dog is", "completion": "cute ."},  # overlong prompt: filtered
        {"prompt": "a zebra is", "completion": "cute ."},  # an unknown word
        {"prompt": "a cat is"},  # malformed
    ]
    cfg = F.DataConfig("completion", 4, 6, on_error="skip")
    line = F.load_dataset(rows, tok, cfg).summary()
    assert line == (
        "<list of rows> (completion): 2/4 rows kept; 1 overlong filtered, 0 prompts and 0 "
        "completions truncated, 0 degenerate pairs (chosen == rejected) dropped, 1 malformed "
        "skipped, 1 with unknown tokens"
    )


@pytest.mark.parametrize(
    "name, filename, content, config, pattern", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_input(tmp_path, tok, name, filename, content, config, pattern):
    if filename is None:
        path = tmp_path / "nope.jsonl"
    else:
        path = tmp_path / filename
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif filename.endswith(".parquet"):
            write_parquet(path, content)
        else:
            write_jsonl(path, content)
    with pytest.raises(F.DataError, match=pattern) as info:
        F.load_dataset(path, tok, F.DataConfig(**config))
    assert str(info.value).startswith(str(path))  # the error names the file first


def test_messages_without_chat_template(tok_no_template):
    with pytest.raises(
        F.DataError, match=r"row 1, field 'prompt': is conversational .* no chat template"
    ):
        F.load_dataset([{"prompt": user("a dog is")}], tok_no_template, F.DataConfig("prompt", 4))


def test_bad_configs_and_sources(tok):
    with pytest.raises(ValueError, match="kind must be one of"):
        F.DataConfig("chat", 4)
    with pytest.raises(ValueError, match="num_completions"):
        F.DataConfig("ranking", 4, 10)
    with pytest.raises(ValueError, match="max_completion_length must be >= 1"):
        F.DataConfig("preference", 4)
    with pytest.raises(F.DataError, match="unsupported source"):
        F.load_dataset(42, tok, F.DataConfig("prompt", 4))
    ds = F.load_dataset([{"prompt": "a dog is"}], tok, F.DataConfig("prompt", 4))
    with pytest.raises(ValueError, match="batch_size must be between 1 and the dataset size 1"):
        F.DataLoader(ds, 2)


# --- shuffling and the resumable cursor -----------------------------------------------------------


@pytest.fixture(scope="module")
def sft_dataset(tok):
    return F.load_dataset(toy.sft_records(23, seed=5), tok, F.DataConfig("completion", 4, 10))


def test_epochs_are_seeded_permutations(sft_dataset):
    loader = F.DataLoader(sft_dataset, 5, seed=3)
    assert loader.batches_per_epoch == 4
    first = [next(loader) for _ in range(4)]  # one epoch: 20 of 23 examples, no repeats
    seen = np.concatenate([b["index"] for b in first])
    assert len(set(seen.tolist())) == 20
    np.testing.assert_array_equal(seen, F.epoch_permutation(23, 3, 0)[:20])
    np.testing.assert_array_equal(
        first[0]["prompt_tokens"], sft_dataset.arrays["prompt_tokens"][first[0]["index"]]
    )
    assert loader.cursor == {"seed": 3, "epoch": 0, "position": 20}
    nxt = next(loader)  # the partial batch is dropped: epoch 1 starts
    np.testing.assert_array_equal(nxt["index"], F.epoch_permutation(23, 3, 1)[:5])
    assert loader.cursor == {"seed": 3, "epoch": 1, "position": 5}
    assert not np.array_equal(F.epoch_permutation(23, 3, 0), F.epoch_permutation(23, 3, 1))
    other = next(F.DataLoader(sft_dataset, 5, seed=4))
    assert not np.array_equal(other["index"], first[0]["index"])
    assert list(F.DataLoader(sft_dataset, 5, seed=3, num_epochs=2)).__len__() == 8


def test_cursor_resume_gives_the_same_next_batches(sft_dataset):
    a = F.DataLoader(sft_dataset, 4, seed=11)
    for _ in range(7):  # into the second epoch (5 batches per epoch)
        next(a)
    saved = json.loads(json.dumps(a.cursor))
    expected = [next(a) for _ in range(9)]
    b = F.DataLoader(sft_dataset, 4, cursor=saved)
    for want in expected:
        assert_arrays_equal(next(b), want)
    with pytest.raises(ValueError, match=re.escape("lacks ['position']")):
        F.DataLoader(sft_dataset, 4, cursor={"seed": 1, "epoch": 0})
