"""The project's own formulas page exists and holds every section the code and tests cite."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CITE = re.compile(r"formulas\.md`*\s*(§[^)\n:;]*)")  # 'docs/formulas.md §1, §9.1-9.3, 9.7'
NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def _cited_sections():
    """Every '§N' / '§N.M' written right after 'docs/formulas.md' in the package and the tests."""
    cited = {}
    for top in ("rlhf_jax", "tests", "docs"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if not name.endswith((".py", ".md")):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                for match in CITE.finditer(text):
                    for number in NUMBER.findall(match.group(1)):
                        cited.setdefault(number, os.path.relpath(path, ROOT))
    return cited


def _headings():
    with open(os.path.join(ROOT, "docs", "formulas.md"), encoding="utf-8") as f:
        text = f.read()
    top = set(re.findall(r"^## §([0-9]+) ", text, flags=re.M))
    sub = set(re.findall(r"^### ([0-9]+\.[0-9]+) ", text, flags=re.M))
    return top | sub


def test_every_cited_section_of_docs_formulas_exists():
    cited = _cited_sections()
    assert {"1", "3", "4", "9.1", "9.10"} <= set(cited)  # the citations are found at all
    headings = _headings()
    assert {str(n) for n in range(1, 10)} <= headings  # §1 ... §9
    missing = {s: where for s, where in cited.items() if s not in headings}
    assert not missing, f"cited but not in docs/formulas.md: {missing}"


def test_no_file_outside_the_repository_is_cited():
    for top in ("rlhf_jax", "docs", "tests"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith((".py", ".md")) and name != os.path.basename(__file__):
                    with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                        assert "rlhf-formulas.md" not in f.read(), os.path.join(dirpath, name)
