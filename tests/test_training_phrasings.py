"""The paraphrase spread's phrasings really are unseen: no content word shared with any training phrasing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.edits import EDITS, Edit, black_and_white
from training.paraphrases import PHRASINGS_PER_EDIT, content_words, load_unseen_phrasings


def test_every_edit_has_five_unseen_phrasings_sharing_no_content_word_with_training() -> None:
    unseen = load_unseen_phrasings()
    assert set(unseen.by_edit) == {edit.name for edit in EDITS}
    assert all(len(p) == PHRASINGS_PER_EDIT for p in unseen.by_edit.values())
    assert unseen.overlaps(EDITS) == {}
    trained = {p for edit in EDITS for p in (*edit.phrasings, *edit.held_out)}
    assert not trained & {p for ps in unseen.by_edit.values() for p in ps}


def test_the_overlap_check_catches_shared_words_and_their_inflections() -> None:
    unseen = load_unseen_phrasings()
    sketchy = Edit("pencil_sketch", black_and_white, ("make it a pencil drawing",), ())
    planted = type(unseen)({"pencil_sketch": ("drawings with a Pencil", "doodled in a margin")}, unseen.function_words)
    assert planted.overlaps((sketchy,)) == {"drawings with a Pencil": {"draw", "pencil"}}
    assert content_words("make it look like a photo", unseen.function_words) == {"photo"}


def test_a_file_with_too_few_phrasings_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "unseen.json"
    path.write_text(json.dumps({"function_words": ["a"], "phrasings": {"sepia": ["a", "b", "c", "d"]}}))
    with pytest.raises(ValueError, match="sepia needs 5 distinct phrasings"):
        load_unseen_phrasings(path)
