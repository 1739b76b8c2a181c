"""The evaluation's unseen phrasings: five per edit sharing no content word with any training phrasing."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from training.edits import Edit

UNSEEN_PHRASINGS_FILE = Path(__file__).with_name("unseen_phrasings.json")
PHRASINGS_PER_EDIT = 5


def content_words(phrase: str, function_words: frozenset[str]) -> set[str]:
    """Lower-case word stems of `phrase` that are not function words ("drawings" and "drawing" both give "draw")."""
    stems = set()
    for word in re.findall(r"[a-z0-9]+", phrase.lower()):
        if word in function_words:
            continue
        # A crude stemmer is enough here: it only has to make the check stricter, never looser.
        stripped = True
        while stripped:
            stripped = False
            for suffix in ("ing", "ed", "es", "s", "y"):
                if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                    word, stripped = word[: -len(suffix)], True
                    break
        stems.add(word)
    return stems


@dataclass(frozen=True)
class UnseenPhrasings:
    """Each edit's unseen phrasings and the function words they may share with training phrasings."""

    by_edit: dict[str, tuple[str, ...]]
    function_words: frozenset[str]

    def overlaps(self, edits: tuple[Edit, ...]) -> dict[str, set[str]]:
        """Per unseen phrasing, the content words it shares with any training phrasing (empty when clean)."""
        trained: set[str] = set()
        for edit in edits:
            for phrasing in edit.phrasings:
                trained |= content_words(phrasing, self.function_words)
        return {
            phrasing: shared
            for phrasings in self.by_edit.values()
            for phrasing in phrasings
            if (shared := content_words(phrasing, self.function_words) & trained)
        }


def load_unseen_phrasings(path: Path = UNSEEN_PHRASINGS_FILE) -> UnseenPhrasings:
    """Read and check the file: every entry a list of PHRASINGS_PER_EDIT distinct, non-empty phrasings."""
    data = json.loads(path.read_text())
    by_edit: dict[str, tuple[str, ...]] = {}
    for name, phrasings in data["phrasings"].items():
        if len(set(phrasings)) != PHRASINGS_PER_EDIT or not all(p.strip() for p in phrasings):
            raise ValueError(f"{path}: {name} needs {PHRASINGS_PER_EDIT} distinct phrasings, got {phrasings}")
        by_edit[name] = tuple(phrasings)
    return UnseenPhrasings(by_edit, frozenset(data["function_words"]))
