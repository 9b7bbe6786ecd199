"""House rules of the repository: its text points only at files that are in it, and ruff is clean."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

_TEXT = ("*.py", "*.md", "*.yaml", "*.sh", "*.cfg", "*.toml", "*.txt")
# Paths written as placeholders in usage examples.
_PLACEHOLDERS = {"configs/study/FILE.yaml", "configs/x.yaml"}


def _files():
    for pattern in _TEXT:
        for path in REPO.rglob(pattern):
            rel = path.relative_to(REPO)
            if rel.parts[0].startswith(".") or rel.parts[0].endswith(".egg-info") or rel.parts[0] == "build":
                continue
            yield rel, path.read_text(errors="replace")


def test_no_references_to_files_outside_the_repository():
    """Design notes, platform notes and issue numbers are not part of the repository: the code,
    README and docs/ must stand on their own."""
    outside = re.compile(r"DESIGN\.md|STYLE\.md|PLATFORM\.md|\.\./shared|\bissue[ -]#?\d+\b", re.IGNORECASE)
    found = [f"{rel}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
             for rel, text in _files() if rel != Path(__file__).resolve().relative_to(REPO)
             for m in outside.finditer(text)]
    assert not found, "references to files outside the repository:\n" + "\n".join(found)


def test_referenced_repository_files_exist():
    path = re.compile(r"(?<![\w/.-])((?:docs|multimae_att|data_prep|scripts|configs|tests)/[\w/.-]+"
                      r"\.(?:py|md|yaml|sh|json))")
    missing = [f"{rel}: {m.group(1)}" for rel, text in _files() for m in path.finditer(text)
               if m.group(1) not in _PLACEHOLDERS and not (REPO / m.group(1)).exists()]
    assert not missing, "references to files that do not exist:\n" + "\n".join(missing)


def test_ruff_is_clean():
    """Lint and import order as configured in pyproject.toml (ruff comes with the test extra)."""
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install -c constraints.txt -e '.[test]')")
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "."], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
