"""The docs cite only what ships: CITATION.cff, docs/references.bib and docs/reference.md agree
with each other and with pyproject.toml, and nothing cites a notes file outside the repository."""

from __future__ import annotations

import re
import tomllib

import yaml

from tests.conftest import ROOT

REFERENCE = ROOT / "docs" / "reference.md"
BIB = ROOT / "docs" / "references.bib"
#: a citation in the markdown: pandoc's [@key] (several: [@a; @b]) or LaTeX's \cite{a,b}
PANDOC = re.compile(r"\[(@[\w:.-]+(?:\s*;\s*@[\w:.-]+)*)\]")
LATEX = re.compile(r"\\cite[tp]?\{([^}]*)\}")
ENTRY = re.compile(r"^@(\w+)\s*\{\s*([^,\s]+)\s*,", re.MULTILINE)


def cited_keys(text: str) -> set[str]:
    keys = set()
    for group in PANDOC.findall(text):
        keys.update(k.strip().lstrip("@") for k in group.split(";"))
    for group in LATEX.findall(text):
        keys.update(k.strip() for k in group.split(","))
    return keys


def bib_entries(text: str) -> dict[str, str]:
    """Key -> the entry's text (up to the next entry)."""
    matches = list(ENTRY.finditer(text))
    out = {}
    for m, following in zip(matches, [*matches[1:], None]):
        key = m.group(2)
        assert key not in out, f"duplicate BibTeX key {key}"
        out[key] = text[m.start() : following.start() if following else len(text)]
    return out


def test_citation_cff_is_valid_and_matches_pyproject():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for key in ("cff-version", "message", "title", "authors", "type", "version"):
        assert cff.get(key), f"CITATION.cff: {key} missing"
    assert cff["cff-version"] == "1.2.0"
    assert cff["title"] == "fedsim"
    assert cff["type"] == "software"
    assert cff["authors"] == [{"name": "The fedsim developers"}]  # an entity, not a person
    assert str(cff["version"]) == project["version"]
    license_ = project.get("license")
    if isinstance(license_, dict):
        license_ = license_.get("text")
    if license_:
        assert cff["license"] == license_
    assert str(cff["date-released"]) == "2026-12-06"
    assert set(cff) <= {  # CFF 1.2.0's keys (a typo would make the file invalid)
        "abstract", "authors", "cff-version", "commit", "contact", "date-released", "doi",
        "identifiers", "keywords", "license", "license-url", "message", "preferred-citation",
        "references", "repository", "repository-artifact", "repository-code", "title", "type",
        "url", "version",
    }  # fmt: skip


def test_every_cited_key_is_in_the_bib_and_every_entry_is_cited():
    cited = cited_keys(REFERENCE.read_text(encoding="utf-8"))
    entries = bib_entries(BIB.read_text(encoding="utf-8"))
    assert cited, "docs/reference.md cites nothing"
    missing, uncited = sorted(cited - set(entries)), sorted(set(entries) - cited)
    assert not missing, f"cited in docs/reference.md but not in references.bib: {missing}"
    assert not uncited, f"in references.bib but never cited in docs/reference.md: {uncited}"
    for key, entry in entries.items():
        for field in ("author", "title", "year"):
            assert re.search(rf"^\s*{field}\s*=", entry, re.MULTILINE), f"{key}: no {field}"
        assert entry.count("{") == entry.count("}"), f"{key}: unbalanced braces"


def test_reference_md_links_resolve():
    """Every ``(#anchor)`` in docs/reference.md is one of its headings (GitHub's slugs), and
    the README and docs/strategies.md link to it."""
    text = REFERENCE.read_text(encoding="utf-8")
    slugs = set()
    for heading in re.findall(r"^#+\s+(.+)$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    missing = sorted(set(re.findall(r"\]\(#([^)]+)\)", text)) - slugs)
    assert not missing, f"anchors with no heading: {missing}"
    for doc in ("README.md", "docs/strategies.md"):
        assert "reference.md" in (ROOT / doc).read_text(encoding="utf-8"), doc
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        anchors = re.findall(r"reference\.md#([^)\s]+)\)", doc.read_text(encoding="utf-8"))
        assert set(anchors) <= slugs, f"{doc.name}: no such heading {sorted(set(anchors) - slugs)}"


def test_nothing_cites_a_notes_file_outside_the_repository():
    forbidden = ("REFERENCE" + " section", "REFERENCE" + ".md")
    patterns = ("README.md", "docs/**/*.md", "conf/**/*.yaml", "examples/**/*")
    patterns += tuple(f"{d}/**/*.py" for d in ("fedsim", "strategies", "benchmarks", "tests"))
    hits = []
    for pattern in patterns:
        for path in sorted(ROOT.glob(pattern)):
            if not path.is_file() or path.name == "test_citation.py":
                continue
            text = path.read_text(encoding="utf-8", errors="ignore")
            hits += [f"{path.relative_to(ROOT)}: {f}" for f in forbidden if f in text]
    assert not hits, "cite docs/reference.md instead:\n" + "\n".join(hits)
