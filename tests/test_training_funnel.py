"""Channel funnels on tiny TAESDs: widening keeps the function, CSI starts close, training lowers the
loss, and the merged narrow decoder computes what the funnelled one does; the recipe runs, resumes and loads;
the capacity measurement widens whole autoencoders exactly and scores each variant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderTiny

from tests.test_engine_loading import make_tiny_student_folder
from training.ae_capacity import CapacityConfig, Variant, measure, render, widened_start
from training.config import load_config
from training.data import REPO_ROOT
from training.funnel import Funnels, coupled_singular_init, funnel, merge, widen
from training.funnel_decoder import FunnelDecoderConfig, decoder_plan, train, widened_taesd
from training.loop import read_loss_log
from training.models import load_taesd


def tiny_taesd(width: int = 8, seed: int = 0) -> AutoencoderTiny:
    torch.manual_seed(seed)
    return AutoencoderTiny(encoder_block_out_channels=(width,) * 4, decoder_block_out_channels=(width,) * 4).eval()


def saved_tiny_taesd(tmp_path: Path) -> Path:
    start = tmp_path / "start"
    tiny_taesd().save_pretrained(str(start))
    return start


def tiny_run(output_dir: Path, start: Path, **fields: Any) -> dict[str, Any]:
    """Seconds-long recipe fields: batch 2, a loss line every step, one photo's 32² crops."""
    return {
        "output_dir": output_dir,
        "init_from": start,
        "batch_size": 2,
        "warmup_steps": 1,
        "log_every": 1,
        "threads": 1,
        "ema_decay": 0.0,
        "save_dtype": "float32",
        "data": {"photos": ["astronaut"], "clips": [], "val_photos": ["chelsea"], "val_clips": [], "crop_size": 32},
        **fields,
    }


def latents(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def test_the_decoder_plan_names_every_conv_and_shares_the_stream_across_identity_skips() -> None:
    decoder = tiny_taesd().decoder
    plan = decoder_plan(decoder)
    convs = [n for n, m in decoder.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(plan.layers) == sorted(convs)
    assert plan.layers["layers.0"][0] is None and plan.layers[convs[-1]][1] is None  # latents in, RGB out
    block_in, _ = plan.layers["layers.2.conv.0"]
    assert plan.layers["layers.2.conv.4"][1] == block_in, "a block writes back into the stream it reads"
    assert set(plan.widths.values()) == {8}


def test_widening_keeps_the_function_and_csi_of_the_widened_decoder_starts_near_it() -> None:
    narrow = tiny_taesd()
    plan = decoder_plan(narrow.decoder)
    wide = widen(narrow.decoder, widened_taesd(narrow, 16).decoder, plan, 1e-2, torch.Generator().manual_seed(0))
    z = latents()
    with torch.no_grad():
        expected = narrow.decoder(z)
        assert torch.allclose(wide(z), expected, atol=1e-5)
        csi = funnel(wide, plan, coupled_singular_init(wide, plan))(z)
        shapes = coupled_singular_init(wide, plan)
        generator = torch.Generator().manual_seed(2)
        random = {s: torch.linalg.qr(torch.randn(16, w, generator=generator))[0] for s, w in plan.widths.items()}
        rand = funnel(wide, plan, Funnels({s: q.T for s, q in random.items()}, random))(z)
    assert set(shapes.narrowing) == set(plan.widths)
    # CSI recovers the narrow function's subspace; random orthonormal funnels do not.
    assert (csi - expected).abs().mean() < 0.05 * (rand - expected).abs().mean()


def test_funnel_training_lowers_the_loss_and_the_merge_is_exact() -> None:
    narrow = tiny_taesd()
    plan = decoder_plan(narrow.decoder)
    wide = widened_taesd(narrow, 16).decoder  # random wide weights: CSI must still give a working start
    funnelled = funnel(wide, plan, coupled_singular_init(wide, plan)).train()
    z, target = latents(4), torch.rand(4, 3, 64, 64) * 2 - 1
    optimizer = torch.optim.Adam(funnelled.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(funnelled(z), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    # The funnels themselves were trained, not only the wide weights around them.
    assert not torch.allclose(funnelled.funnels.narrowing["s0"], coupled_singular_init(wide, plan).narrowing["s0"])
    merged = merge(funnelled, tiny_taesd(seed=5).decoder).eval()
    with torch.no_grad():
        assert torch.allclose(merged(z), funnelled.eval()(z), atol=1e-5, rtol=1e-4)
    assert [p.shape for p in merged.parameters()] == [p.shape for p in narrow.decoder.parameters()]


def test_merge_refuses_a_network_of_other_widths() -> None:
    narrow = tiny_taesd()
    plan = decoder_plan(narrow.decoder)
    wide = widened_taesd(narrow, 16).decoder
    funnelled = funnel(wide, plan, coupled_singular_init(wide, plan))
    with pytest.raises(ValueError, match="merged weight"):
        merge(funnelled, tiny_taesd(width=4).decoder)


def test_the_recipe_runs_its_phases_resumes_and_writes_a_decoder_of_the_served_width(tmp_path: Path) -> None:
    start = saved_tiny_taesd(tmp_path)
    config = FunnelDecoderConfig.model_validate(
        tiny_run(tmp_path / "run", start, steps=6, checkpoint_every=3, wide_channels=16, wide_steps=4)
    )
    final = train(config)
    served = load_taesd(final)
    assert served.config.decoder_block_out_channels == [8, 8, 8, 8]
    original = load_taesd(start)
    for a, b in zip(served.encoder.parameters(), original.encoder.parameters(), strict=True):
        assert torch.equal(a, b), "the encoder is kept, so latents (and UNets) stay valid"
    assert any(
        not torch.equal(a, b) for a, b in zip(served.decoder.parameters(), original.decoder.parameters(), strict=True)
    )
    assert [r["step"] for r in read_loss_log(tmp_path / "run" / "wide")] == [1, 2, 3, 4]
    assert [r["step"] for r in read_loss_log(tmp_path / "run" / "funnel")] == [1, 2, 3, 4, 5, 6]
    # Re-running resumes both phases from their last checkpoints and writes the same decoder.
    before = {k: v.clone() for k, v in served.decoder.state_dict().items()}
    again = load_taesd(train(config))
    for k, v in again.decoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert json.loads((tmp_path / "run" / "wide" / "config.json").read_text())["steps"] == 4


def test_the_default_config_funnels_the_shipped_decoder_back_to_itself_before_training() -> None:
    config = load_config(FunnelDecoderConfig, REPO_ROOT / "training/configs/default_funnel_decoder.yaml", [])
    shipped = load_taesd(REPO_ROOT / config.init_from)
    plan = decoder_plan(shipped.decoder)
    assert set(plan.widths.values()) == {16} and config.wide_channels > 16
    generator = torch.Generator().manual_seed(0)
    wide = widen(shipped.decoder, widened_taesd(shipped, config.wide_channels).decoder, plan, 1e-2, generator)
    z = latents()
    with torch.no_grad():
        expected = shipped.decoder(z)
        start = funnel(wide, plan, coupled_singular_init(wide, plan))(z)
    assert torch.allclose(wide(z), expected, atol=1e-4)
    assert (start - expected).abs().max() < 0.02


@pytest.mark.parametrize(("width", "latent_channels"), [(None, None), (16, None), (None, 8), (12, 6)])
def test_a_whole_taesd_widens_exactly_in_its_blocks_and_its_latent(
    width: int | None, latent_channels: int | None
) -> None:
    start = tiny_taesd()
    variant = Variant(name="v", width=width, latent_channels=latent_channels)
    wide = widened_start(start, variant, 1e-2, 0).eval()
    assert wide.config.latent_channels == (latent_channels or 4)
    assert wide.config.encoder_block_out_channels[0] == (width or 8)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(round_trip_tensor(wide, x), round_trip_tensor(start, x), atol=1e-5)


def round_trip_tensor(taesd: AutoencoderTiny, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return taesd.decode(taesd.encode(x).latents).sample


def test_the_capacity_measurement_trains_each_variant_and_scores_its_round_trip(tmp_path: Path) -> None:
    start = saved_tiny_taesd(tmp_path)
    config = CapacityConfig.model_validate(
        tiny_run(
            tmp_path / "capacity",
            start,
            steps=3,
            checkpoint_every=3,
            resolution=32,
            edits=["negative"],
            variants=[{"name": "control"}, {"name": "latent 8", "latent_channels": 8}],
        )
    )
    results = measure(config)
    assert list(results) == ["start (not trained further)", "control", "latent 8"]
    for by_set in results.values():
        assert list(by_set) == ["frames", "negative"]
        assert all(0 < s["psnr"] < 100 and s["sharpness"] > 0 for s in by_set.values())
    # Three steps moved the trained variants away from the start they all began at.
    assert results["control"]["frames"]["psnr"] != results["start (not trained further)"]["frames"]["psnr"]
    assert [r["step"] for r in read_loss_log(tmp_path / "capacity" / "latent 8")] == [1, 2, 3]
    assert "| frames |" in render(results, config)


def test_the_decoder_also_learns_a_students_outputs_and_resumes_exactly(tmp_path: Path) -> None:
    """With `student`, batches decode a one-step student's x̂0 towards the exact edit; the phases resume as before."""
    student = make_tiny_student_folder(tmp_path / "student")
    fields = tiny_run(
        tmp_path / "run",
        student / "taesd",
        student=student,
        prompts={"encoder": "clip", "clip_folder": student, "tokens": 8},
        student_share=1.0,
        student_identity_share=0.5,
        steps=4,
        checkpoint_every=2,
        wide_channels=16,
        wide_steps=2,
    )
    config = FunnelDecoderConfig.model_validate(fields)
    served = load_taesd(train(config))
    assert served.config.decoder_block_out_channels == load_taesd(student / "taesd").config.decoder_block_out_channels
    rows = read_loss_log(tmp_path / "run" / "funnel")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["psnr"] > 0 for r in rows)
    before = {k: v.clone() for k, v in served.decoder.state_dict().items()}
    again = load_taesd(train(config))
    assert all(torch.equal(v, before[k]) for k, v in again.decoder.state_dict().items())

    other = FunnelDecoderConfig.model_validate(
        {**fields, "output_dir": tmp_path / "other", "init_from": saved_tiny_taesd(tmp_path)}
    )
    with pytest.raises(ValueError, match="reads latents of another encoder"):
        train(other)
