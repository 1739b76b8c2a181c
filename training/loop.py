"""The loop every recipe runs: resume, learning-rate schedule, EMA, progress bar, loss log and checkpoints."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from training.checkpoint import TrainState, resume_latest, save_checkpoint
from training.config import TrainConfig
from training.distributed import Ranks, mean_metrics

LOSS_LOG = "loss_log.jsonl"
CONFIG_COPY = "config.json"

# One optimisation step: takes the step index, returns the scalars to log (e.g. {"loss": 0.1}).
StepFn = Callable[[int], dict[str, float]]


class EMA(nn.Module):
    """An exponential moving average of a module's weights (decay warms up as in diffusers' EMAModel)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        n = int(self.updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        for s, p in zip(self.shadow.parameters(), model.parameters(), strict=True):
            s.lerp_(p.detach(), 1.0 - decay)
        for s, b in zip(self.shadow.buffers(), model.buffers(), strict=True):
            s.copy_(b)


def lr_factor(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay from 1 to final_lr_fraction over the remaining steps."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return config.final_lr_fraction + (1 - config.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


def make_adamw(
    params: list[nn.Parameter], lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW whose groups remember their base lr (the loop scales it by lr_factor each step)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)
    for group in optimizer.param_groups:
        group["base_lr"] = lr
    return optimizer


def module_train_state(
    config: TrainConfig, module: nn.Module, name: str, rng: object, ranks: Ranks | None = None
) -> tuple[list[nn.Parameter], torch.optim.AdamW, EMA | None, TrainState]:
    """The trainable parameters, AdamW, optional EMA and resumable state of a recipe that trains one module
    (checkpointed under `name`). With several ranks, the module must already hold rank 0's weights (its DDP
    wrapper gave them), so that every rank's EMA starts from the same ones."""
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_adamw(params, config.lr, config.weight_decay)
    modules: dict[str, nn.Module] = {name: module}
    ema = EMA(module, config.ema_decay) if config.ema_decay > 0 else None
    if ema is not None:
        modules["ema"] = ema
    state = TrainState(modules, {name: optimizer}, rng, ranks=ranks or Ranks())  # type: ignore[arg-type]
    return params, optimizer, ema, state


def unet_train_state(
    config: TrainConfig, unet: nn.Module, rng: object, ranks: Ranks | None = None
) -> tuple[list[nn.Parameter], torch.optim.AdamW, EMA | None, TrainState]:
    """module_train_state for a recipe that trains one UNet (with gradient checkpointing if the config asks)."""
    if getattr(config, "gradient_checkpointing", False):
        unet.enable_gradient_checkpointing()  # type: ignore[operator]
    return module_train_state(config, unet, "unet", rng, ranks)


def unet_precision(config: TrainConfig) -> contextlib.AbstractContextManager[object]:
    """Where UNet passes run: under bf16 autocast when the config's mixed_precision says so, else as they are."""
    if getattr(config, "mixed_precision", "no") == "bf16":
        return torch.autocast(getattr(config, "device", "cpu"), dtype=torch.bfloat16)
    return contextlib.nullcontext()


def clip_and_step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the gradient norm, step, zero the gradients; returns the norm before clipping."""
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def read_loss_log(output_dir: Path) -> list[dict[str, float]]:
    path = Path(output_dir) / LOSS_LOG
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint being resumed (they will be written again)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def run_training(config: TrainConfig, state: TrainState, step_fn: StepFn, desc: str) -> TrainState:
    """Resume from the newest checkpoint, run `step_fn` until config.steps, checkpointing and logging on the way."""
    out = Path(config.output_dir)
    main = state.ranks.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_COPY).write_text(config.model_dump_json(indent=2) + "\n")
    if config.threads:
        torch.set_num_threads(config.threads)
    resumed = resume_latest(out, state)
    if resumed is not None and main:
        print(f"[{desc}] resumed from {resumed} at step {state.step}", file=sys.stderr, flush=True)
    log_path = out / LOSS_LOG
    if main:
        _truncate_log(log_path, state.step)
    bar = tqdm(
        total=config.steps,
        initial=state.step,
        desc=desc if state.ranks.world_size == 1 else f"{desc} ×{state.ranks.world_size} ranks",
        mininterval=config.progress_interval,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not main,
    )
    sums: dict[str, float] = {}
    count = 0
    started = time.monotonic()
    with log_path.open("a") if main else contextlib.nullcontext() as log_file:
        while state.step < config.steps:
            factor = lr_factor(config, state.step)
            for optimizer in state.optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
            metrics = mean_metrics(state.ranks, step_fn(state.step))
            bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
            if bad:
                raise FloatingPointError(f"[{desc}] non-finite metrics at step {state.step}: {bad}")
            state.step += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            bar.update(1)
            if state.step % config.log_every == 0 or state.step == config.steps:
                means = {k: v / count for k, v in sums.items()}
                line = {
                    "step": state.step,
                    "time": round(time.time(), 1),
                    "lr_factor": factor,
                    "elapsed_s": time.monotonic() - started,
                    **means,
                }
                if log_file is not None:
                    log_file.write(json.dumps(line) + "\n")
                    log_file.flush()
                bar.set_postfix({k: f"{v:.4g}" for k, v in means.items()}, refresh=False)
                sums, count = {}, 0
            if state.step % config.checkpoint_every == 0 or state.step == config.steps:
                save_checkpoint(out, state, config.keep_checkpoints)
    bar.close()
    return state
