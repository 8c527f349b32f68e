"""Every repository path the README and the docs name exists, and every Markdown link resolves.

Paths are the backticked `experiments/...`, `rlhf_jax/...`, `tests/...`, `docs/...` names
(a `*` is a glob that must match something); links are `[text](relative/path)`. Paths under a run
directory (`runs/...`, `exports/...`, `checkpoints/...`, `data/...`) are examples, not files of
the repository, and are not checked.
"""

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))]
PATH = re.compile(r"`((?:experiments|rlhf_jax|tests|docs)/[A-Za-z0-9_./*-]+)`")
LINK = re.compile(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", DOCS)
def test_named_paths_exist(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        text = f.read()
    base = os.path.dirname(os.path.join(ROOT, doc))
    missing = [p for p in PATH.findall(text) if not glob.glob(os.path.join(ROOT, p.rstrip("/")))]
    missing += [
        link
        for link in LINK.findall(text)
        if not os.path.exists(os.path.normpath(os.path.join(base, link)))
    ]
    assert not missing, f"{doc} names paths that do not exist: {missing}"
