"""The README and the docs are for users: every measured figure is rendered from a committed result
file (``scripts/render_docs.py``) and the committed text equals its rendering; the Quickstart runs
as pasted; no word of the project's own process."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("render_docs", ROOT / "scripts" / "render_docs.py")
render_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_docs)


@pytest.mark.parametrize("name", render_docs.DOCS)
def test_document_equals_its_rendering(name):
    text = (ROOT / name).read_text(encoding="utf-8")
    blocks = render_docs.BLOCK.findall(text)
    assert blocks, f"{name} has no rendered block"
    assert render_docs.render(text, str(Path(name).parent)) == text, (
        f"{name} differs from its result files: run python scripts/render_docs.py")


def test_every_block_is_used_and_reads_its_file(monkeypatch):
    used = {m["name"] for name in render_docs.DOCS for m in render_docs.BLOCK.finditer((ROOT / name).read_text())}
    assert used == set(render_docs.BLOCKS)
    load = render_docs.load

    def altered(path):  # every number of every result file moved: every block must change
        return _scaled(load(path))

    readme = (ROOT / "README.md").read_text()
    monkeypatch.setattr(render_docs, "load", altered)
    before = {m["name"]: m["body"] for m in render_docs.BLOCK.finditer(readme)}
    after = {m["name"]: m["body"] for m in render_docs.BLOCK.finditer(render_docs.render(readme))}
    assert [name for name in before if before[name] == after[name]] == []


def _scaled(value):
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float):
        return value * 1.37 + 0.011
    if isinstance(value, dict):
        return {k: _scaled(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_scaled(v) for v in value]
    return value


def test_unknown_block_is_an_error():
    with pytest.raises(KeyError, match="unknown rendered block 'nope'"):
        render_docs.render("<!-- render:nope -->\n<!-- /render -->\n")


@pytest.mark.parametrize("name", ["README.md", "docs/api.md", "docs/evidence/README.md"])
def test_no_process_words(name):
    text = (ROOT / name).read_text(encoding="utf-8")
    words = re.findall(r"\b(?:issues?|targets|T[1-4]|sessions?|predicted|predictions?|SPEC)\b", text)
    assert words == [], words


def test_readme_quickstart_runs_as_pasted():
    pytest.importorskip("transformers")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md Quickstart", "exec"), {"__name__": "__quickstart__"})
    assert re.match(r"loss [+-]\d\.\d{4}; advantages \[", out.getvalue()), out.getvalue()
