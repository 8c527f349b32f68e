"""Tests of the "safety" row kind (PKU-SafeRLHF style) of rlhf_jax.data.formats."""

import json
import re

import numpy as np
import pytest

from rlhf_jax.data import formats as F
from rlhf_jax.data import toy

P, R = 4, 6
PAD, BOS, EOS = 0, 1, 4  # the toy tokenizer's <pad>, <bos> and its EOS "."


@pytest.fixture(scope="module")
def tok():
    return toy.toy_tokenizer()


def cfg(**kw):
    return F.DataConfig(
        **{"kind": "safety", "max_prompt_length": P, "max_completion_length": R, **kw}
    )


def row(prompt, r0, r1, better=0, safer=0, safe0=True, safe1=True):
    return {
        "prompt": prompt,
        "response_0": r0,
        "response_1": r1,
        "better_response_id": better,
        "safer_response_id": safer,
        "is_response_0_safe": safe0,
        "is_response_1_safe": safe1,
    }


ROWS = [
    row("a dog is", "a furry animal .", "a metal tool", better=0, safer=0, safe0=True, safe1=False),
    row("the cat looks", "a rotten cake .", "a very friendly pet .", 1, 1, False, True),
    row("my horse seems", "shiny and useful .", "a furry animal .", 1, 0, True, True),
]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


def expected_arrays(tok, rows):
    """The arrays built independently: tokenize, append "." where missing, pad by hand."""
    n = len(rows)
    pt, pm = np.full((n, P), PAD, np.int32), np.zeros((n, P), np.int32)
    rt, rm = np.full((n, 2, R), PAD, np.int32), np.zeros((n, 2, R), np.int32)
    for i, r in enumerate(rows):
        p = tok(r["prompt"])["input_ids"]
        assert p[0] == BOS
        pt[i, P - len(p) :], pm[i, P - len(p) :] = p, 1
        for k in (0, 1):
            c = tok(r[f"response_{k}"], add_special_tokens=False)["input_ids"]
            if c[-1] != EOS:
                c = [*c, EOS]
            rt[i, k, : len(c)], rm[i, k, : len(c)] = c, 1
    return {
        "prompt_tokens": pt,
        "prompt_mask": pm,
        "response_tokens": rt,
        "response_mask": rm,
        "better": np.array([r["better_response_id"] for r in rows], np.int32),
        "safer": np.array([r["safer_response_id"] for r in rows], np.int32),
        "safe": np.array(
            [[int(r["is_response_0_safe"]), int(r["is_response_1_safe"])] for r in rows], np.int32
        ),
    }


def assert_arrays_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == np.int32, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_jsonl_arrays_and_labels(tmp_path, tok):
    path = toy.write_jsonl(tmp_path / "s.jsonl", ROWS)
    ds = F.load_dataset(path, tok, cfg())
    assert ds.kind == "safety" and len(ds) == 3
    assert (ds.stats.rows_read, ds.stats.rows_kept, ds.stats.degenerate_pairs) == (3, 3, 0)
    assert_arrays_equal(ds.arrays, expected_arrays(tok, ROWS))
    a = ds.arrays
    assert a["response_tokens"].shape == (3, 2, R) and a["safe"].shape == (3, 2)
    # spot values written out by hand: row 1 is "<bos> a dog is" / "a furry animal ." /
    # "a metal tool" + the appended ".", in file order (not reordered by better/safer)
    np.testing.assert_array_equal(a["prompt_tokens"][0], [BOS, 5, 9, 20])
    np.testing.assert_array_equal(a["response_tokens"][0, 0], [5, 33, 23, EOS, PAD, PAD])
    np.testing.assert_array_equal(a["response_tokens"][0, 1], [5, 46, 28, EOS, PAD, PAD])
    np.testing.assert_array_equal(a["response_mask"][1, 1], [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(a["better"], [0, 1, 1])
    np.testing.assert_array_equal(a["safer"], [0, 1, 0])
    np.testing.assert_array_equal(a["safe"], [[1, 0], [0, 1], [1, 1]])
    batch = next(F.DataLoader(ds, batch_size=2, seed=0))
    assert set(batch) == {*expected_arrays(tok, ROWS), "index"}
    np.testing.assert_array_equal(batch["safe"], a["safe"][batch["index"]])


def test_parquet_round_trip(tmp_path, tok):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is needed to write Parquet")
    import pyarrow.parquet as pq

    path = str(tmp_path / "s.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    ds = F.load_dataset(path, tok, cfg())
    assert_arrays_equal(ds.arrays, expected_arrays(tok, ROWS))


def test_numpy_ints_and_bools_are_accepted(tok):
    rows = [
        {
            **r,
            "better_response_id": np.int64(r["better_response_id"]),
            "safer_response_id": np.int32(r["safer_response_id"]),
            "is_response_0_safe": np.bool_(r["is_response_0_safe"]),
            "is_response_1_safe": np.bool_(r["is_response_1_safe"]),
        }
        for r in ROWS
    ]
    ds = F.load_dataset(rows, tok, cfg())
    assert_arrays_equal(ds.arrays, expected_arrays(tok, ROWS))


def test_conversational_form(tmp_path, tok):
    conv = [
        {
            **r,
            "prompt": user(r["prompt"]),
            "response_0": assistant(r["response_0"]),
            "response_1": assistant(r["response_1"]),
        }
        for r in ROWS
    ]
    path = toy.write_jsonl(tmp_path / "c.jsonl", conv)
    ds = F.load_dataset(path, tok, cfg())
    # the toy chat template joins contents with spaces after <bos>: the same tokens as the text
    assert_arrays_equal(ds.arrays, expected_arrays(tok, ROWS))

    bad = [conv[0], {**conv[1], "response_1": user("a furry animal .")}]
    path = toy.write_jsonl(tmp_path / "bad.jsonl", bad)
    with pytest.raises(
        F.DataError,
        match=re.escape(
            "line 2, field 'response_1': completion messages must have role 'assistant'"
        ),
    ):
        F.load_dataset(path, tok, cfg())
    mixed = [{**ROWS[0], "response_0": assistant("a furry animal .")}]
    with pytest.raises(F.DataError, match=r"row 1, field 'response_0': is a list of messages"):
        F.load_dataset(mixed, tok, cfg())


def _without(r, key):
    return {k: v for k, v in r.items() if k != key}


BAD = [
    ("missing", _without(ROWS[1], "safer_response_id"), "safer_response_id", "missing field"),
    ("null", {**ROWS[1], "response_0": None}, "response_0", "is null"),
    ("id 2", {**ROWS[1], "better_response_id": 2}, "better_response_id", "must be the integer 0 or 1, got 2"),
    ("id True", {**ROWS[1], "better_response_id": True}, "better_response_id", "got bool True"),
    ("id 0.5", {**ROWS[1], "safer_response_id": 0.5}, "safer_response_id", "got float 0.5"),
    ("id 1.0", {**ROWS[1], "safer_response_id": 1.0}, "safer_response_id", "got float 1.0"),
    ("flag 1", {**ROWS[1], "is_response_0_safe": 1}, "is_response_0_safe", "must be a boolean, got int 1; use true/false"),
    ("flag yes", {**ROWS[1], "is_response_1_safe": "yes"}, "is_response_1_safe", "got str 'yes'; use true/false"),
]  # fmt: skip


@pytest.mark.parametrize("rowval,field,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_rows_name_line_and_field(tmp_path, tok, rowval, field, message):
    path = toy.write_jsonl(tmp_path / "d.jsonl", [ROWS[0], rowval, ROWS[2]])
    with pytest.raises(F.DataError) as info:
        F.load_dataset(path, tok, cfg())
    err = info.value
    assert (err.row, err.field) == (2, field)
    assert str(err).startswith(f"{path}, line 2, field '{field}': ")
    assert message in str(err)


def test_on_error_skip_counts(tmp_path, tok):
    rows = [ROWS[0], BAD[2][1], ROWS[1], BAD[6][1], BAD[0][1], ROWS[2]]
    path = toy.write_jsonl(tmp_path / "d.jsonl", rows)
    ds = F.load_dataset(path, tok, cfg(on_error="skip"))
    assert (ds.stats.rows_read, ds.stats.rows_kept, ds.stats.skipped_malformed) == (6, 3, 3)
    assert [re.search(r"line (\d+), field '(\w+)'", e).groups() for e in ds.stats.errors] == [
        ("2", "better_response_id"),
        ("4", "is_response_0_safe"),
        ("5", "safer_response_id"),
    ]
    assert_arrays_equal(ds.arrays, expected_arrays(tok, ROWS))


def test_degenerate_pairs(tmp_path, tok):
    # "a furry animal" and "a furry animal ." are the same tokens once the EOS is appended
    same = row("a dog is", "a furry animal", "a furry animal .", 1, 0, True, False)
    rows = [ROWS[0], same, ROWS[1]]
    ds = F.load_dataset(rows, tok, cfg())
    assert (ds.stats.rows_read, ds.stats.rows_kept, ds.stats.degenerate_pairs) == (3, 2, 1)
    assert_arrays_equal(ds.arrays, expected_arrays(tok, [ROWS[0], ROWS[1]]))
    kept = F.load_dataset(rows, tok, cfg(degenerate_pairs="keep"))
    assert (kept.stats.rows_kept, kept.stats.degenerate_pairs) == (3, 1)
    np.testing.assert_array_equal(kept.arrays["better"], [0, 1, 1])
    with pytest.raises(F.DataError) as info:
        F.load_dataset(rows, tok, cfg(degenerate_pairs="error"))
    assert (info.value.row, info.value.field) == (2, "response_1")
    assert "is the same as 'response_0' (after tokenization)" in str(info.value)
    skip = F.load_dataset(rows, tok, cfg(degenerate_pairs="error", on_error="skip"))
    assert (skip.stats.rows_kept, skip.stats.skipped_malformed) == (2, 1)


def test_overlong(tok):
    long = row("a dog is", "a furry animal .", "a very friendly and very shiny pet .", 0, 1)
    rows = [ROWS[0], long, ROWS[2]]
    ds = F.load_dataset(rows, tok, cfg())  # overlong="filter" by default
    assert (ds.stats.rows_kept, ds.stats.filtered_overlong) == (2, 1)
    assert_arrays_equal(ds.arrays, expected_arrays(tok, [ROWS[0], ROWS[2]]))
    with pytest.raises(F.DataError) as info:
        F.load_dataset(rows, tok, cfg(overlong="error"))
    assert (info.value.row, info.value.field) == (2, "response_1")
    assert f"has 8 tokens, more than max_completion_length={R}" in str(info.value)
    cut = F.load_dataset(rows, tok, cfg(overlong="truncate"))
    assert (cut.stats.rows_kept, cut.stats.truncated_completions) == (3, 1)
    first = tok("a very friendly and very shiny pet .", add_special_tokens=False)["input_ids"][:R]
    np.testing.assert_array_equal(cut.arrays["response_tokens"][1, 1], first)
    np.testing.assert_array_equal(cut.arrays["response_tokens"][1, 0], [5, 33, 23, EOS, PAD, PAD])


def test_config_and_parse_row_labels(tok):
    with pytest.raises(ValueError, match="max_completion_length must be >= 1 for kind 'safety'"):
        F.DataConfig(kind="safety", max_prompt_length=P)
    assert "safety" in F.KINDS
    prompt, completions, labels = F.parse_row(ROWS[1], cfg())
    assert (prompt, completions) == ("the cat looks", ["a rotten cake .", "a very friendly pet ."])
    assert labels == {"better": 1, "safer": 1, "safe": (0, 1)}
    pref = F.DataConfig(kind="preference", max_prompt_length=P, max_completion_length=R)
    assert F.parse_row({"prompt": "a", "chosen": "b", "rejected": "c"}, pref)[2] == {}
    row_m = {"prompt": "a", "chosen": "b", "rejected": "c", "margin": 2}
    assert F.parse_row(row_m, pref)[2] == {"margin": 2.0}


def test_judge_read_pairs_still_reads_preference_rows(tmp_path):
    from rlhf_jax import judge

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a dog is", "chosen": "x .", "rejected": "y ."}) + "\n")
    assert judge.read_pairs(str(path)) == [("a dog is", "x .", "y .")]
