"""The documentation site cannot go stale: its Python examples run, every method has a page.

* every ``docs/examples/*.py`` runs to the end in a fresh process (the pages include their sections
  with ``--8<--``, so what a reader copies is what ran here); the examples load real models from PyPI
  packages, so they are marked ``real_model``;
* every kind in ``unipeft.METHODS`` has a page under ``docs/methods/`` with its
  ``<!-- unipeft:method KIND -->`` marker (the build renders its facts and defaults from the code),
  that page is in ``mkdocs.yml``'s nav and linked from the methods index table;
* the index table's type, mergeable and routes columns agree with each config class
  (``method_type``, ``mergeable``, ``routable``), so the hand-written table cannot drift;
* every name of ``unipeft.__all__`` is on the API page or a method page;
* every ``--8<--`` include names an existing example file and section.

``mkdocs build --strict`` itself (broken links, missing references) runs in ``scripts/docs.sh``
(CI: ``.ci/run``).
"""
import os
import re
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

import unipeft as up

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.py"))
MARKER = re.compile(r"<!--\s*unipeft:method\s+([a-z0-9_]+)\s*-->")
INCLUDE = re.compile(r'--8<--\s+"([^":]+)(?::([\w-]+))?"')


def test_examples_exist():
    assert len(EXAMPLES) >= 5, EXAMPLES


def _run_example(example: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, str(example)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


# Each example is a one-thread process of 15-30 s: two run side by side (the one under test and the next
# one selected), so the examples take half their serial time on a 2-core machine.
_POOL = ThreadPoolExecutor(max_workers=2)
_STARTED: dict[Path, Future] = {}


@pytest.mark.real_model
@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(example, request, tmp_path_factory):
    selected = [item.callspec.params["example"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_example_runs"]
    at = selected.index(example)
    for ex in selected[at:at + 2]:
        if ex not in _STARTED:
            _STARTED[ex] = _POOL.submit(_run_example, ex, tmp_path_factory.mktemp(ex.stem))
    proc = _STARTED.pop(example).result()
    assert proc.returncode == 0, f"{example.name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.stdout.rstrip().endswith("ok"), proc.stdout[-2000:]


def method_pages() -> dict[str, Path]:
    """kind -> the page that carries its marker."""
    pages = {}
    for page in sorted((DOCS / "methods").glob("*.md")):
        for kind in MARKER.findall(page.read_text()):
            assert kind not in pages, f"{kind} has two pages: {pages[kind].name} and {page.name}"
            pages[kind] = page
    return pages


def test_every_method_has_a_page_in_the_nav_and_the_index():
    pages = method_pages()
    missing = sorted(set(up.METHODS) - set(pages))
    assert not missing, f"methods without a docs page (a docs/methods/*.md with <!-- unipeft:method KIND -->): {missing}"
    unknown = sorted(set(pages) - set(up.METHODS))
    assert not unknown, f"pages for kinds that are not in unipeft.METHODS: {unknown}"
    nav = (ROOT / "mkdocs.yml").read_text()
    index = (DOCS / "methods" / "index.md").read_text()
    table_links = set(re.findall(r"^\|.*\]\(([\w.-]+\.md)\)\s*\|\s*$", index, flags=re.M))
    for kind, page in pages.items():
        assert f"methods/{page.name}" in nav, f"{page.name} ({kind}) is not in mkdocs.yml's nav"
        assert page.name in table_links, f"{page.name} ({kind}) has no row in docs/methods/index.md's table"


def test_index_table_agrees_with_the_classes():
    pages = method_pages()
    kinds_of = {}
    for kind, page in pages.items():
        kinds_of.setdefault(page.name, []).append(kind)
    rows = [r for r in (DOCS / "methods" / "index.md").read_text().splitlines()
            if r.startswith("| ") and "](" in r]
    checked = 0
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        # the Call column may hold "|" inside code spans only in theory; ours do not
        name, typ, merge, routes, link = cells[0], cells[-4], cells[-3], cells[-2], cells[-1]
        page = re.search(r"\(([\w.-]+\.md)\)", link).group(1)
        for kind in kinds_of.get(page, []):     # AdapterDrop's page has no kind of its own (it is "adapter")
            cls = up.METHODS[kind]
            assert typ == cls.method_type, f"{name}: index says type {typ!r}, {cls.__name__} says {cls.method_type!r}"
            assert merge == ("yes" if cls.mergeable else "no"), f"{name}: index says mergeable {merge!r}"
            assert routes.startswith("yes") == cls.routable, f"{name}: index says routes {routes!r}"
            checked += 1
    assert checked >= len(pages), (checked, len(pages))


def test_every_public_name_is_documented():
    text = (DOCS / "api" / "unipeft.md").read_text() + "".join(
        p.read_text() for p in (DOCS / "methods").glob("*.md"))
    undocumented = [n for n in up.__all__ if f"up.{n}" not in text and f".{n}\n" not in text
                    and f"`{n}`" not in text]
    assert not undocumented, f"public names on no API or method page: {undocumented}"


def test_includes_point_at_existing_sections():
    for page in DOCS.rglob("*.md"):
        for path, section in INCLUDE.findall(page.read_text()):
            target = ROOT / path
            assert target.is_file(), f"{page.relative_to(ROOT)} includes missing {path}"
            if section:
                src = target.read_text()
                assert f"--8<-- [start:{section}]" in src and f"--8<-- [end:{section}]" in src, \
                    f"{page.relative_to(ROOT)} includes {path}:{section}, a section that does not exist"
