"""Prompt routing (engines/routing.py, training/prompt_routes.py, training/pixel_finetune.py) on the real
all-MiniLM-L6-v2 encoder: a prompt becomes a blend of the trained edits' contexts, the empty prompt stays 'no
instruction', a model folder that asks for routing loads its table or says what is wrong, and a routed student
is fine-tuned in pixel space."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from engines.client import READING_FLOOR
from engines.config import DEFAULT_MODEL_DIR, ROUTES_FILE, EditorConfig, PromptRouting
from engines.loader import load_editor
from engines.model import EditorModel, ModelFolderError
from engines.routing import PHRASING_MEANS, RoutedPromptEncoder, RouteTable, edit_weights, sentence_embeddings
from engines.spec import EngineSpec
from engines.text import MiniLMPromptEncoder
from tests.test_engine_loading import make_tiny_pix2pix_folder, mobile_pix2pix_config, tiny_sd15_unet_config
from training.budgeted_finetune import budgeted_steps
from training.budgeted_finetune import main as budgeted_main
from training.checkpoint import CHECKPOINT_DIR
from training.edits import get_edits
from training.loop import read_loss_log
from training.pixel_finetune import PixelFinetuneConfig
from training.pixel_finetune import train as train_pixel_finetune
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


def test_a_reading_names_the_edits_a_prompt_became_heaviest_first(base: MiniLMPromptEncoder, table: RouteTable) -> None:
    routing = PromptRouting()
    routed = RoutedPromptEncoder(base, table, routing)
    prompt = NEW_WORDINGS["sepia"]
    reading = routed.read(prompt)
    weights = routed.weights([prompt])[0]
    named = {name: float(w) for name, w in zip(table.edit_names, weights, strict=True) if w >= READING_FLOOR}
    assert reading == sorted(named.items(), key=lambda item: -item[1])
    assert reading[0][0] == "sepia"
    # A wording between two edits is read as both, so a user sees the blend they will get.
    mixed = routed.read("an old brown photo drawn in pencil")
    assert [name for name, _ in mixed] == ["pencil_sketch", "sepia"]
    # Words that name no edit are read as an unsure blend, which is what a client can warn about.
    vague = routed.read("hello world")
    assert len(vague) >= 2 and vague[0][1] < 0.9
    assert routed.read("") == routed.read("  ") == []  # no instruction: no edit


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
    spec = EngineSpec(weights=folder, backend="torch")
    assert load_editor(spec).read_prompt("brownish antique tint") is None  # fed as it is: nothing to tell

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
    assert load_editor(spec).read_prompt("brownish antique tint")[0][0] == "sepia"

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
    """One truth: the shipped table's phrasings are what phrasings.json and routing_phrasings.json build now, and its
    contexts their means unless the table says a run tuned them."""
    config = EditorConfig.load(DEFAULT_MODEL_DIR)
    if config.prompt_routing is None:
        pytest.skip("the shipped default does not route its prompts")
    shipped = RouteTable.load(DEFAULT_MODEL_DIR / ROUTES_FILE)
    rebuilt = build_route_table(get_edits(), load_routing_phrasings(), base)
    assert shipped.edit_names == rebuilt.edit_names
    assert torch.equal(shipped.edit_of_phrasing, rebuilt.edit_of_phrasing)
    torch.testing.assert_close(shipped.phrasings, rebuilt.phrasings, atol=2e-3, rtol=0)
    if shipped.contexts_source == PHRASING_MEANS:
        torch.testing.assert_close(shipped.edit_contexts, rebuilt.edit_contexts, atol=1e-4, rtol=1e-4)
    else:  # trained weights, like the UNet's: the table says which run made them (the model card has its config)
        assert shipped.contexts_source.startswith("tuned in pixel space by training.pixel_finetune")


def test_the_pixel_finetune_tunes_the_contexts_and_unet_it_is_asked_to_and_resumes_exactly(tmp_path: Path) -> None:
    """training.pixel_finetune moves the edits' contexts (and with train_unet the UNet) by gradient through the
    frozen decoder; the phrasings and the autoencoder stay as they were, and a run resumed from a checkpoint ends
    exactly where an unbroken one does."""
    folder = _pooled_folder(tmp_path / "model")
    with pytest.raises(ValueError, match="has no prompt_routes.safetensors: route it first"):
        train_pixel_finetune(_finetune_run(tmp_path / "unrouted", folder))
    phrasings = tmp_path / "routing.json"
    phrasings.write_text(json.dumps({"phrasings": {"sepia": ["brownish antique tint"]}}))
    assert main(["--model", str(folder), "--phrasings", str(phrasings)]) == 0
    start = RouteTable.load(folder / ROUTES_FILE)

    def same_files(final: Path, part: str) -> bool:
        return all((final / part / f.name).read_bytes() == f.read_bytes() for f in (folder / part).iterdir())

    contexts_only = train_pixel_finetune(_finetune_run(tmp_path / "contexts", folder))
    tuned = RouteTable.load(contexts_only / ROUTES_FILE)
    assert tuned.edit_names == start.edit_names and torch.equal(tuned.phrasings, start.phrasings)
    assert torch.equal(tuned.edit_of_phrasing, start.edit_of_phrasing)
    assert bool(((tuned.edit_contexts - start.edit_contexts).norm(dim=-1) > 0).any()), "no edit's context moved"
    assert same_files(contexts_only, "unet") and same_files(contexts_only, "taesd")
    rows = read_loss_log(tmp_path / "contexts")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["moved"] >= 0 for r in rows)
    assert isinstance(EditorModel.from_pretrained(contexts_only).prompt_encoder, RoutedPromptEncoder)
    assert tuned.contexts_source.startswith("tuned in pixel space by training.pixel_finetune (4 steps")
    # Rebuilding the phrasings keeps tuned contexts; --reset-contexts goes back to the phrasing means.
    assert main(["--model", str(contexts_only), "--phrasings", str(phrasings)]) == 0
    kept = RouteTable.load(contexts_only / ROUTES_FILE)
    assert torch.equal(kept.edit_contexts, tuned.edit_contexts) and kept.contexts_source == tuned.contexts_source
    assert main(["--model", str(contexts_only), "--phrasings", str(phrasings), "--reset-contexts"]) == 0
    reset = RouteTable.load(contexts_only / ROUTES_FILE)
    assert reset.contexts_source == PHRASING_MEANS
    torch.testing.assert_close(reset.edit_contexts, start.edit_contexts)

    config = _finetune_run(tmp_path / "unet", folder, train_unet=True, preserve_share=0.5, identity_share=0.25)
    final = train_pixel_finetune(config)
    assert not same_files(final, "unet") and same_files(final, "taesd")
    unet = EditorModel.from_pretrained(final).unet.state_dict()
    # Resume: from the step-2 checkpoint the run replays the same draws and ends with the same weights.
    (tmp_path / "unet" / CHECKPOINT_DIR / "step-00000004.pt").unlink()
    again = train_pixel_finetune(config)
    assert all(torch.equal(v, unet[k]) for k, v in EditorModel.from_pretrained(again).unet.state_dict().items())
    assert torch.equal(
        RouteTable.load(again / ROUTES_FILE).edit_contexts, RouteTable.load(final / ROUTES_FILE).edit_contexts
    )

    with pytest.raises(ValueError, match="nothing to train"):
        train_pixel_finetune(_finetune_run(tmp_path / "nothing", folder, context_lr=0.0))


def test_the_pixel_finetune_gives_the_decoder_a_frame_skip_and_trains_only_what_it_is_asked_to(tmp_path: Path) -> None:
    """With frame_skip and decoder_lr alone, the decoder and its new frame skip move (by the pixel and SSIM losses);
    the encoder, UNet and contexts stay as they were; the final folder's decoder reads the frame; resume is exact."""
    folder = _pooled_folder(tmp_path / "model")
    phrasings = tmp_path / "routing.json"
    phrasings.write_text(json.dumps({"phrasings": {"sepia": ["brownish antique tint"]}}))
    assert main(["--model", str(folder), "--phrasings", str(phrasings)]) == 0
    start = EditorModel.from_pretrained(folder)
    assert not start.codec.reads_frames
    config = _finetune_run(
        tmp_path / "skip",
        folder,
        context_lr=0.0,
        decoder_lr=0.01,
        frame_skip=True,
        frame_skip_kernel=3,
        ssim_weight=1,
        preserve_share=0.5,
        preserve_lowpass_sigma=1.0,
        order_rows=2,
    )
    final = train_pixel_finetune(config)
    rows = read_loss_log(tmp_path / "skip")
    assert len(rows) == 4 and all(r["order"] >= 0 for r in rows)  # the ordered pairs' hinge ran every step
    tuned = EditorModel.from_pretrained(final)
    assert tuned.codec.reads_frames and tuned.codec.frame_skip is not None
    assert tuned.codec.frame_skip.proj.kernel_size == (3, 3)
    assert float(tuned.codec.frame_skip.proj.weight.abs().max()) > 0, "the zero-initialised skip never moved"
    encoder, decoder = start.codec.taesd.encoder.state_dict(), start.codec.taesd.decoder.state_dict()
    assert all(torch.equal(v, encoder[k]) for k, v in tuned.codec.taesd.encoder.state_dict().items())
    assert not all(torch.equal(v, decoder[k]) for k, v in tuned.codec.taesd.decoder.state_dict().items())
    unet = start.unet.state_dict()
    assert all(torch.equal(v, unet[k]) for k, v in tuned.unet.state_dict().items())
    assert torch.equal(
        RouteTable.load(final / ROUTES_FILE).edit_contexts, RouteTable.load(folder / ROUTES_FILE).edit_contexts
    )
    skip = tuned.codec.frame_skip.state_dict()
    (tmp_path / "skip" / CHECKPOINT_DIR / "step-00000004.pt").unlink()
    again = EditorModel.from_pretrained(train_pixel_finetune(config)).codec
    assert again.frame_skip is not None and all(
        torch.equal(v, skip[k]) for k, v in again.frame_skip.state_dict().items()
    )
    # A second run on the skipped student keeps its skip and trains it further.
    further = EditorModel.from_pretrained(
        train_pixel_finetune(_finetune_run(tmp_path / "further", final, context_lr=0.0, decoder_lr=0.01))
    ).codec
    assert further.frame_skip is not None and not torch.equal(further.frame_skip.proj.weight, skip["proj.weight"])
    # A run may remove decoder blocks to buy back their cost: the final folder is a stock TAESD with fewer blocks
    # whose decoder still reads the frame; a pruned decoder that would not be trained is refused up front.
    with pytest.raises(ValueError, match="drop_decoder_blocks needs decoder_lr > 0"):
        _finetune_run(tmp_path / "unsaved", final, context_lr=0.0, drop_decoder_blocks=[8])
    pruned = EditorModel.from_pretrained(
        train_pixel_finetune(
            _finetune_run(tmp_path / "pruned", final, context_lr=0.0, decoder_lr=0.01, drop_decoder_blocks=[8])
        )
    ).codec
    assert tuple(pruned.taesd.config.num_decoder_blocks) == (1, 1, 0, 1) and pruned.reads_frames
    assert len(pruned.taesd.decoder.layers) == len(again.taesd.decoder.layers) - 1


def test_steady_rows_are_a_loss_and_a_budgeted_run_brings_back_only_what_it_changed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Steady rows log how far camera-like noise moves the output, and training on them (weight 100, nothing else)
    moves it less; training.budgeted_finetune times the config, runs what its budget holds and packs the run's
    config, loss log, decoder and frame skip, but not the unchanged UNet."""
    folder = _pooled_folder(tmp_path / "model")
    phrasings = tmp_path / "routing.json"
    phrasings.write_text(json.dumps({"phrasings": {"sepia": ["brownish antique tint"]}}))
    assert main(["--model", str(folder), "--phrasings", str(phrasings)]) == 0
    with pytest.raises(ValueError, match="steady_rows .9. exceeds batch_size .4."):
        _finetune_run(tmp_path / "too_many", folder, steady_rows=9)
    steady = {"context_lr": 0.0, "decoder_lr": 0.01, "frame_skip": True, "steady_rows": 4, "steady_noise": 8.0}
    only_steady = {**steady, "l1_weight": 0.0, "mse_weight": 0.0, "steady_weight": 100.0, "steps": 12}
    train_pixel_finetune(_finetune_run(tmp_path / "steady", folder, **only_steady))
    gaps = [r["steady"] for r in read_loss_log(tmp_path / "steady")]
    assert len(gaps) == 12 and gaps[0] > 0
    assert sum(gaps[-3:]) < 0.5 * sum(gaps[:3]), f"steadiness did not improve: {gaps}"

    config = tmp_path / "budgeted.json"
    config.write_text(_finetune_run(tmp_path / "budgeted", folder, **steady, steps=1000).model_dump_json())
    args = ["--config", str(config), "--probe-steps", "3", "--round-to", "2", "--pack", str(tmp_path / "run.tar.gz")]
    assert budgeted_main([*args, "--budget-s", "1e-6"]) == 2
    assert "fewer than --round-to 2" in capsys.readouterr().err
    assert budgeted_main([*args, "--budget-s", "3"]) == 0
    ran = json.loads((tmp_path / "budgeted" / "config.json").read_text())
    assert 2 <= ran["steps"] < 1000 and ran["steps"] % 2 == 0
    assert not (tmp_path / "budgeted.timing").exists()
    with tarfile.open(tmp_path / "run.tar.gz") as tar:
        packed = set(tar.getnames())
    assert {"config.json", "loss_log.jsonl"} <= packed
    assert any(name.startswith("final/taesd/") for name in packed)
    assert any(name.startswith("final/frame_skip/") for name in packed)
    assert not any(name.startswith("final/unet/") for name in packed), packed
    assert budgeted_steps(1000, 100.0, 0.1, 250) == 750 and budgeted_steps(500, 100.0, 0.1, 250) == 500


def _finetune_run(output_dir: Path, student: Path, **fields: object) -> PixelFinetuneConfig:
    return PixelFinetuneConfig.model_validate(
        {
            "output_dir": output_dir,
            "student": student,
            "prompts": {"encoder": "minilm-pooled", "tokens": 1},
            "steps": 4,
            "batch_size": 4,
            "lr": 0.001,
            "context_lr": 0.05,
            "warmup_steps": 1,
            "log_every": 1,
            "checkpoint_every": 2,
            "threads": 1,
            "ema_decay": 0.0,
            "save_dtype": "float32",
            "data": {"photos": ["astronaut"], "clips": [], "val_photos": ["chelsea"], "val_clips": [], "crop_size": 32},
            **fields,
        }
    )
