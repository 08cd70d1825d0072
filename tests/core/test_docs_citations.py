"""Shipped files cite only Markdown notes that ship: a reader must be able to follow every reference.

Any ``*.md`` named in the package, the recipes, the docs or README must exist in the repository,
either from its root or next to the citing file. URLs are not checked, nor files a training run
writes into its output folder (``final/README.md`` is the model card of a finished run, not a note).
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("diffalign", "trainers", "scorers", "apps", "configs", "docs")
TEXT_SUFFIXES = {".py", ".yaml", ".yml", ".md", ".toml", ".txt", ".json"}
# A URL is matched first and skipped, so only bare paths land in the group.
MARKDOWN_REFERENCE = re.compile(r"https?://\S+|([\w./-]*\w\.md)\b")
# Written by trainers/model_card.py into every run's output folder: cited as an output, never shipped.
RUN_OUTPUTS = {"final/README.md"}


def shipped_files() -> list[Path]:
    files = [REPO / "README.md"]
    for folder in SHIPPED:
        files += [
            path
            for path in sorted((REPO / folder).rglob("*"))
            if path.is_file() and path.suffix in TEXT_SUFFIXES and "__pycache__" not in path.parts
        ]
    return files


def dangling_citations() -> list[str]:
    dangling = []
    for path in shipped_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for match in MARKDOWN_REFERENCE.finditer(line):
                cited = match.group(1)
                if cited is None or cited in RUN_OUTPUTS:
                    continue
                if not ((REPO / cited).is_file() or (path.parent / cited).is_file()):
                    dangling.append(f"{path.relative_to(REPO)}:{number}: {cited}")
    return dangling


def test_every_cited_markdown_file_exists_in_the_repository():
    dangling = dangling_citations()
    assert not dangling, "cited notes that do not ship (cite the paper or a file under docs/):\n" + "\n".join(
        dangling
    )


def test_run_outputs_exempt_from_the_check_are_files_a_run_writes():
    """The exemption may not grow into a way to silence a real dangling note."""
    from diffalign.trainers.export import MODEL_CARD_FILE

    assert RUN_OUTPUTS == {f"final/{MODEL_CARD_FILE}"}
