"""Prompt routing (engines/routing.py, training/prompt_routes.py) on the real all-MiniLM-L6-v2 encoder: a prompt
becomes a blend of the trained edits' contexts, the empty prompt stays 'no instruction', and a model folder that asks
for routing loads its table or says what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engines.config import DEFAULT_MODEL_DIR, ROUTES_FILE, EditorConfig, PromptRouting
from engines.model import EditorModel, ModelFolderError
from engines.routing import RoutedPromptEncoder, RouteTable, edit_weights, sentence_embeddings
from engines.text import MiniLMPromptEncoder
from tests.test_engine_loading import make_tiny_pix2pix_folder, mobile_pix2pix_config, tiny_sd15_unet_config
from training.edits import get_edits
from training.prompt_routes import build_route_table, load_routing_phrasings, main, route_phrasings

EDITS = ("black_and_white", "sepia", "pencil_sketch")
# Wordings in no phrasing of these three edits (checked below), each clearly one of them.
NEW_WORDINGS = {
    "black_and_white": "strip out every hue, greys only",
    "sepia": "brownish antique tint",
    "pencil_sketch": "a graphite study of the scene",
}


@pytest.fixture(scope="module")
def base() -> MiniLMPromptEncoder:
    return MiniLMPromptEncoder.named("minilm-pooled", tokens=1)


@pytest.fixture(scope="module")
def table(base: MiniLMPromptEncoder) -> RouteTable:
    return build_route_table(get_edits(list(EDITS)), {}, base)


def test_new_wordings_route_to_their_edit_and_read_as_its_trained_context(
    base: MiniLMPromptEncoder, table: RouteTable
) -> None:
    edits = get_edits(list(EDITS))
    known = {p for e in edits for p in (*e.phrasings, *e.held_out)}
    assert not known & set(NEW_WORDINGS.values())
    sharp = RoutedPromptEncoder(base, table, PromptRouting(top_k=3, temperature=1e-4))
    prompts = list(NEW_WORDINGS.values())
    weights = sharp.weights(prompts)
    assert torch.allclose(weights.sum(1), torch.ones(len(prompts)))
    assert [table.edit_names[i] for i in weights.argmax(1).tolist()] == list(NEW_WORDINGS)
    # At a low temperature every wording of an edit is fed as that edit's context: one output, whatever the words.
    contexts = sharp.encode(prompts)
    for i, name in enumerate(NEW_WORDINGS):
        torch.testing.assert_close(contexts[i], table.edit_contexts[table.edit_names.index(name)])
    # The edit's context is the mean of its training phrasings' own contexts.
    sepia = get_edits(["sepia"])[0]
    torch.testing.assert_close(table.edit_contexts[1, 0], base.encode(list(sepia.phrasings))[:, 0].mean(0))


def test_a_routed_context_is_the_weighted_blend_and_the_empty_prompt_keeps_its_own(
    base: MiniLMPromptEncoder, table: RouteTable
) -> None:
    routing = PromptRouting()
    routed = RoutedPromptEncoder(base, table, routing)
    prompts = ["make it look old", "", "   "]
    contexts = routed.encode(prompts)
    weights = edit_weights(sentence_embeddings(base.encode(prompts[:1])), table, routing)
    torch.testing.assert_close(contexts[0], torch.einsum("e,etd->td", weights[0], table.edit_contexts))
    null = base.encode([""])[0]
    torch.testing.assert_close(contexts[1], null)
    torch.testing.assert_close(contexts[2], base.encode(["   "])[0])
    assert not torch.allclose(contexts[0], null)


def test_a_table_survives_saving_and_a_broken_one_is_refused(table: RouteTable, tmp_path: Path) -> None:
    path = tmp_path / ROUTES_FILE
    table.save(path)
    loaded = RouteTable.load(path)
    assert loaded.edit_names == table.edit_names
    assert torch.equal(loaded.edit_of_phrasing, table.edit_of_phrasing)
    torch.testing.assert_close(loaded.phrasings, table.phrasings, atol=1e-3, rtol=0)  # fp16 on disk
    torch.testing.assert_close(loaded.edit_contexts, table.edit_contexts)
    with pytest.raises(ValueError, match="every edit needs at least one phrasing"):
        RouteTable(table.phrasings, torch.zeros_like(table.edit_of_phrasing), table.edit_names, table.edit_contexts)


def _pooled_folder(root: Path) -> Path:
    unet = mobile_pix2pix_config(tiny_sd15_unet_config(time_cond_proj_dim=16, cross_attention_dim=384))
    editor = EditorConfig(resolution=64, prompt_encoder="minilm-pooled", max_prompt_tokens=1, guidance_embedding_dim=8)
    return make_tiny_pix2pix_folder(root, unet_config=unet, editor_config=editor)


def test_the_builder_routes_a_model_folder_that_then_loads_routed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _pooled_folder(tmp_path / "model")
    phrasings = tmp_path / "routing.json"
    phrasings.write_text(json.dumps({"phrasings": {"sepia": ["brownish antique tint"]}}))

    assert main(["--model", str(folder), "--phrasings", str(phrasings), "--measure"]) == 0
    assert not (folder / ROUTES_FILE).exists() and EditorConfig.load(folder).prompt_routing is None
    assert "held-out phrasings (phrasings.json) routed right:" in capsys.readouterr().out

    assert main(["--model", str(folder), "--phrasings", str(phrasings), "--temperature", "0.05"]) == 0
    assert EditorConfig.load(folder).prompt_routing == PromptRouting(temperature=0.05)
    model = EditorModel.from_pretrained(folder)
    assert isinstance(model.prompt_encoder, RoutedPromptEncoder)
    table = model.prompt_encoder.table
    assert len(table.edit_names) == len(get_edits())
    assert len(table.phrasings) == len(route_phrasings(get_edits(), {"sepia": ("brownish antique tint",)}))

    (folder / ROUTES_FILE).unlink()
    with pytest.raises(ModelFolderError, match="asks for prompt routing but .*prompt_routes.safetensors is missing"):
        EditorModel.from_pretrained(folder)
    (folder / ROUTES_FILE).write_bytes(b"not a table")
    with pytest.raises(ModelFolderError, match="could not load the prompt routes"):
        EditorModel.from_pretrained(folder)


def test_the_builder_answers_bad_input_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _pooled_folder(tmp_path / "model")
    phrasings = tmp_path / "routing.json"
    phrasings.write_text(json.dumps({"phrasings": {"oil_painting": ["like van gogh"]}}))
    assert main(["--model", str(folder), "--phrasings", str(phrasings)]) == 2
    assert "unknown edits ['oil_painting']" in capsys.readouterr().err
    assert main(["--model", str(folder), "--phrasings", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    phrasings.write_text(json.dumps({"sepia": ["brownish antique tint"]}))
    assert main(["--model", str(folder), "--phrasings", str(phrasings)]) == 2
    assert "needs a 'phrasings' object" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "nowhere"), "--phrasings", str(phrasings)]) == 2
    assert "is not a model folder (no unet/config.json)" in capsys.readouterr().err
    tokens = tmp_path / "tokens"
    shutil.copytree(folder, tokens)
    EditorConfig.load(folder).model_copy(update={"prompt_encoder": "minilm", "max_prompt_tokens": 16}).save(tokens)
    phrasings.write_text(json.dumps({"phrasings": {"sepia": ["brownish antique tint"]}}))
    assert main(["--model", str(tokens), "--phrasings", str(phrasings)]) == 2
    assert "reads 'minilm' contexts; routing needs 'minilm-pooled'" in capsys.readouterr().err
    assert not (tokens / ROUTES_FILE).exists()


def test_the_shipped_default_routes_through_a_table_of_todays_phrasings(base: MiniLMPromptEncoder) -> None:
    """One truth: the shipped table is what phrasings.json and routing_phrasings.json build now."""
    config = EditorConfig.load(DEFAULT_MODEL_DIR)
    if config.prompt_routing is None:
        pytest.skip("the shipped default does not route its prompts")
    shipped = RouteTable.load(DEFAULT_MODEL_DIR / ROUTES_FILE)
    rebuilt = build_route_table(get_edits(), load_routing_phrasings(), base)
    assert shipped.edit_names == rebuilt.edit_names
    assert torch.equal(shipped.edit_of_phrasing, rebuilt.edit_of_phrasing)
    torch.testing.assert_close(shipped.phrasings, rebuilt.phrasings, atol=2e-3, rtol=0)
    torch.testing.assert_close(shipped.edit_contexts, rebuilt.edit_contexts, atol=1e-4, rtol=1e-4)
