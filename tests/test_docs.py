"""The README and docs/ hold together: short README, working links, and benchmarks/results/ holds
exactly the logs the docs cite."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
RESULTS = ROOT / "benchmarks" / "results"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_fits_on_a_few_screens():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 100]
    assert not long, f"README lines over 100 characters: {long}"


def test_relative_links_and_anchors_resolve():
    broken = []
    for page in [ROOT / "README.md", ROOT / "infra" / "README.md", *DOCS]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path) if path else page
            if not dest.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor:
                headings = re.findall(r"^#+ (.*)$", dest.read_text(encoding="utf-8"), re.M)
                if anchor not in {_slug(h) for h in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_results_hold_exactly_the_logs_the_docs_cite():
    text = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *DOCS])
    cited = set()
    # a result is cited by its bare name in backticks, e.g. `scaling-cpu-wide.log` or `block70b-h200.{log,json}`
    for stem, exts in re.findall(r"`([a-z0-9]+-[a-z0-9-]+)\.(\{[a-z,]+\}|log|json)`", text):
        for ext in exts.strip("{}").split(","):
            cited.add(f"{stem}.{ext}")
    stored = {p.name for p in RESULTS.iterdir() if p.is_file()}
    assert cited - stored == set(), f"cited but missing: {sorted(cited - stored)}"
    assert stored - cited == set(), f"stored but cited by no doc: {sorted(stored - cited)}"
