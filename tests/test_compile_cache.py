"""The persistent compilation cache: on by default for the command, keyed on what changes the
program. A rerun of the same stage finds every compiled program it needs (no new cache entry);
another batch size (another program) adds entries."""

import os

import jax
import pytest


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from rlhf_jax import quickstart
    from rlhf_jax.data import toy

    out = tmp_path_factory.mktemp("cache")
    quickstart.write_base(str(out / "base"), toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2))
    toy.write_jsonl(out / "sft.jsonl", toy.sft_records(32, seed=0))
    return out


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The cache on in this process, at a fresh directory; off again afterwards."""
    from jax.experimental.compilation_cache import compilation_cache

    path = str(tmp_path / "xla")
    monkeypatch.setenv("RLHF_JAX_COMPILE_CACHE", path)
    yield path
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


def _sft(files, run, batch=8):
    from rlhf_jax import config, pipeline

    overrides = [f"run.dir={run}", "run.progress=false", "run.tensorboard=false",
                 "parallel.mesh.data=1", f"sft.model={files}/base",
                 f"sft.train_file={files}/sft.jsonl", "sft.data.max_prompt_length=4",
                 "sft.data.max_completion_length=10", f"sft.trainer.batch_size={batch}",
                 "sft.trainer.loop.max_steps=2", "sft.save_every=0"]  # fmt: skip
    pipeline.run_stage(config.load_config(None, overrides), "sft", verbose=False)


def _entries(cache):
    return sorted(
        os.path.relpath(os.path.join(d, f), cache)
        for d, _, names in os.walk(cache)
        for f in names
        if not f.endswith("-atime")  # JAX's access-time stamps change on every hit
    )


def test_a_rerun_hits_the_cache_and_new_shapes_miss(files, tmp_path, cache):
    _sft(files, tmp_path / "a")
    first = _entries(cache)
    assert first, "the first run wrote no compiled program"
    _sft(files, tmp_path / "b")  # another run directory, the same programs: all hits
    assert _entries(cache) == first
    _sft(files, tmp_path / "c", batch=16)  # a new shape is a new program
    assert len(_entries(cache)) > len(first)
