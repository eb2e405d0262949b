"""The documentation cannot drift from the code (issue 28): every Python block of the
README and of the site's pages runs, page by page in one namespace, in a fresh directory;
every relative link of the README and the pages leads to a file, and to a heading there."""

import re
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
SLOW = {"library.md", "keras.md"}      # whole runs and fits


def python_blocks(path):
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def slug(heading):
    """The anchor MkDocs (and GitHub) give a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lstrip("#").strip().lower())
    return text.replace(" ", "-")


def headings(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(line) for line in text.splitlines() if re.match(r"^#+ ", line)}


RUNNABLE = [p for p in PAGES if python_blocks(p)]


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p
                                  for p in RUNNABLE], ids=[p.name for p in RUNNABLE])
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # runs write to ./logs here
    keras.utils.set_random_seed(0)       # the tests run with op determinism, which wants seeds
    namespace = {"__name__": "__docs__"}
    for number, block in enumerate(python_blocks(page), 1):
        try:
            exec(compile(block, f"{page.name}, block {number}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"{page.name}, Python block {number} fails: {err!r}\n{block}") from err


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_relative_link_leads_somewhere(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file) if file else page
        assert path.exists(), f"{page.name}: {target} leads to no file"
        if anchor:
            assert anchor in headings(path), f"{page.name}: {target}: no such heading in {path.name}"


def test_the_flags_page_lists_every_flag_and_what_a_resume_may_change():
    import dataclasses

    from tfmbgd.config import CHANGEABLE_ON_RESUME, TrainConfig
    flags_page = (ROOT / "docs" / "flags.md").read_text()
    assert not [f.name for f in dataclasses.fields(TrainConfig) if f"`--{f.name}`" not in flags_page]
    resume = (ROOT / "docs" / "troubleshooting.md").read_text().split("may change")[0][-400:]
    named = [n for n in CHANGEABLE_ON_RESUME if n not in ("resume", "logdir", "checkpoint_every",
                                                          "keep_checkpoints")]
    assert not [n for n in named if f"`--{n}`" not in resume], resume
