"""The edits' phrasings as data (training/phrasings.json) and the paraphrase spread's unseen phrasings, which share
no content word with any training phrasing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.edits import EDIT_FUNCTIONS, EDITS, PHRASINGS_FILE, Edit, black_and_white, load_edits
from training.paraphrases import PHRASINGS_PER_EDIT, content_words, load_unseen_phrasings
from training.prompt_routes import load_routing_phrasings


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


def test_the_phrasings_file_gives_every_edit_its_operation_and_keeps_held_out_phrasings_out_of_training() -> None:
    data = json.loads(PHRASINGS_FILE.read_text())
    assert list(data["edits"]) == list(EDIT_FUNCTIONS) == [e.name for e in EDITS]
    for edit in EDITS:
        entry = data["edits"][edit.name]
        assert edit.fn is EDIT_FUNCTIONS[edit.name]
        assert edit.phrasings[0] == entry["handwritten"][0], "the first handwritten phrasing is the canonical one"
        assert len(edit.held_out) == 2 and not set(edit.held_out) & set(edit.phrasings)
        assert len(edit.phrasings) == len(set(edit.phrasings)) > 50
        for key in ("handwritten", "figurative", "adjectives", "nouns"):
            assert entry[key] and all(p.strip() == p and p for p in entry[key]), (edit.name, key)


def test_an_edit_the_file_names_without_an_operation_is_refused(tmp_path: Path) -> None:
    data = json.loads(PHRASINGS_FILE.read_text())
    data["edits"]["oil_painting"] = data["edits"]["sepia"]
    path = tmp_path / "phrasings.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="oil_painting"):
        load_edits(path)


def test_routing_phrasings_share_no_content_word_with_the_unseen_ones_and_hold_no_held_out_phrasing() -> None:
    """Routing reads these as known wordings of an edit, so they are training data for the paraphrase spread too."""
    routing = load_routing_phrasings()
    assert set(routing) <= {edit.name for edit in EDITS} and sum(map(len, routing.values())) > 12 * 30
    as_edits = tuple(Edit(name, black_and_white, phrasings, ()) for name, phrasings in routing.items())
    assert load_unseen_phrasings().overlaps(as_edits) == {}
    held_out = {p for edit in EDITS for p in edit.held_out}
    assert not held_out & {p for ps in routing.values() for p in ps}
