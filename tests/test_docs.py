"""The documentation cannot drift from the code: the configuration reference is generated and
compared, every link resolves, and every message that sends a user to a page names one that
exists."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from azgpt import config, configdoc
from azgpt.finetune import SFTConfig

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    out, in_code = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            out.add(_slug(line.lstrip("#")))
    return out


def test_config_reference_is_current():
    written = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert written == configdoc.render(), (
        "docs/config.md is stale: run `python -m azgpt.configdoc > docs/config.md`"
    )


def test_every_config_key_has_a_description():
    classes = [
        type(getattr(config.RunConfig(), s.name)) for s in dataclasses.fields(config.RunConfig)
    ]
    for cls in [*classes, SFTConfig]:
        docs = configdoc.field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.init and not docs.get(f.name)]
        assert not missing, f"{cls.__name__} keys without a docstring: {missing}"


def test_the_reference_lists_every_key_with_its_default():
    text = configdoc.render()
    cfg = config.RunConfig()
    for section in dataclasses.fields(config.RunConfig):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            assert f"| `{f.name}` |" in text, f"{section.name}.{f.name} missing"
    for f in dataclasses.fields(SFTConfig):
        assert f"| `{f.name}` |" in text, f"sft.{f.name} missing"
    assert "| `lr` | float |" in text and '| `arch` | str | `"gpt2"` |' in text


def test_every_link_in_the_readme_and_docs_resolves():
    broken = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # links inside code are not links
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)} -> {target} (no such heading)")
    assert not broken, broken


def test_messages_that_point_to_documentation_name_pages_that_exist():
    named, stale = set(), []
    for src in (ROOT / "azgpt").rglob("*.py"):
        text = src.read_text(encoding="utf-8")
        named.update(re.findall(r"docs/[\w.-]+\.md", text))
        # The README is short and points into docs/: a message must name the page itself.
        stale += [
            f"{src.relative_to(ROOT)}: {m}" for m in re.findall(r"see the README[^\"']*", text)
        ]
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"messages point to pages that do not exist: {missing}"
    assert not stale, stale
    assert "docs/serving.md" in named  # the 404 of `azgpt serve` names its page


def test_the_readme_stays_short_and_names_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 160
    assert "make demo" in text and "make test" in text


def test_every_stage_has_a_page_that_starts_with_commands_and_ends_with_what_can_go_wrong():
    for name in (
        "gathering",
        "cleaning",
        "tokenizer",
        "training",
        "evaluation",
        "export",
        "serving",
    ):
        text = (ROOT / "docs" / f"{name}.md").read_text(encoding="utf-8")
        body = text.split("\n", 1)[1].lstrip()
        assert body.startswith("```bash"), f"docs/{name}.md does not open with its commands"
        headings = [ln for ln in text.splitlines() if ln.startswith("## ")]
        assert headings[-1].startswith("## What can go wrong"), f"docs/{name}.md ends elsewhere"


def test_every_test_a_guarantee_names_exists():
    # A row names `tests/file.py::test_name`, or `::test_name` for the file named before it.
    ref = re.compile(r"`((?:tests/[\w/]+\.py)?)(::[\w*]+(?:\[[^\]]*\])?)?`")
    missing, named = [], 0
    for line in (ROOT / "docs" / "guarantees.md").read_text(encoding="utf-8").splitlines():
        if not line.startswith("| "):
            continue
        current = None
        for m in ref.finditer(line):
            path, name = m.group(1), m.group(2)
            current = path or current
            if not (path or name):
                continue
            if current is None or not (ROOT / current).is_file():
                missing.append(f"{current or '?'} in: {line[:60]}")
                continue
            named += 1
            if name:
                pattern = name[2:].split("[")[0].replace("*", r"\w*")
                source = (ROOT / current).read_text(encoding="utf-8")
                if not re.search(rf"def {pattern}\(", source):
                    missing.append(f"{current}{name}")
    assert named > 100 and not missing, missing
