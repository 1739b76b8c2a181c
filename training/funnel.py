"""Channel funnels (MobileVD): a narrow network trained as funnels around wider weights, then merged exactly.

Every planned layer of the narrow network runs as F_out · W · G_in, where W is the wider network's weight and
F_s (narrow × wide) and G_s (wide × narrow) are the learned funnel pair of a channel space s: F narrows what
writes s, G widens what reads s. Coupled singular initialisation takes F_s and G_s from the SVD of the weights
that write s (their top singular vectors: F = Uᵣᵀ, G = Uᵣ), so a trained wide network is approximated as well as
its rank allows before fine-tuning. Merging multiplies the products out into plain narrow layers: the served
graph is the narrow architecture itself, with no extra layers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FunnelledModule = nn.Conv2d | nn.Linear


@dataclass(frozen=True)
class FunnelPlan:
    """Which channel space each layer reads and writes (None: not funnelled on that side), and each space's
    narrow width. Layers that share a space (a residual stream) must agree on it."""

    layers: dict[str, tuple[str | None, str | None]]
    widths: dict[str, int]


def _weight_matrix(weight: torch.Tensor, side: str) -> torch.Tensor:
    """A layer weight (out, in, *kernel) as a matrix whose rows are its `side` ('out' or 'in') channels."""
    return weight.flatten(1) if side == "out" else weight.transpose(0, 1).flatten(1)


class Funnels(nn.Module):
    """The learned funnel pairs, one per channel space: narrowing F_s and widening G_s."""

    def __init__(self, narrowing: dict[str, torch.Tensor], widening: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.narrowing = nn.ParameterDict({s: nn.Parameter(t.clone()) for s, t in narrowing.items()})
        self.widening = nn.ParameterDict({s: nn.Parameter(t.clone()) for s, t in widening.items()})


def coupled_singular_init(wide: nn.Module, plan: FunnelPlan) -> Funnels:
    """Funnels from the SVD of the wide weights that write each space (all writers side by side)."""
    modules = dict(wide.named_modules())
    narrowing, widening = {}, {}
    for space, width in plan.widths.items():
        writers = [
            _weight_matrix(modules[p].weight.detach(), "out") for p, (_, out) in plan.layers.items() if out == space
        ]
        if not writers:
            # A space nothing writes (fed from outside): its readers decide its principal directions.
            writers = [
                _weight_matrix(modules[p].weight.detach(), "in") for p, (inp, _) in plan.layers.items() if inp == space
            ]
        u, _, _ = torch.linalg.svd(torch.cat(writers, dim=1).double(), full_matrices=False)
        if u.shape[1] < width:
            raise ValueError(f"space {space}: the wide layers have rank ≤ {u.shape[1]}, below its width {width}")
        top = u[:, :width]
        # Activations (ReLU, SiLU, GroupNorm) act channel by channel, so a rotated basis of the subspace would
        # scramble what they see: turn the basis within the subspace towards the channels carrying most of it
        # (orthogonal Procrustes). Where the subspace is spanned by channels, the funnel becomes their selection.
        keep = (top**2).sum(1).topk(width).indices.sort().values
        axes = torch.zeros_like(top)
        axes[keep, torch.arange(width)] = 1
        p, _, qh = torch.linalg.svd(top.T @ axes)
        top = (top @ (p @ qh)).float()
        narrowing[space], widening[space] = top.T.contiguous(), top.contiguous()
    return Funnels(narrowing, widening)


class FunnelledLayer(nn.Module):
    """A wide Conv2d or Linear run as the narrow layer F_out · W · G_in (the product is formed per call)."""

    def __init__(self, wide: FunnelledModule, funnels: Funnels, in_space: str | None, out_space: str | None) -> None:
        super().__init__()
        if isinstance(wide, nn.Conv2d) and wide.groups != 1:
            raise ValueError("grouped convolutions cannot be funnelled")
        self.wide = wide
        self.funnels = [funnels]  # a list keeps the shared module out of this one's parameters
        self.in_space, self.out_space = in_space, out_space

    def narrow_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        funnels = self.funnels[0]
        weight, bias = self.wide.weight, self.wide.bias
        if self.in_space is not None:
            weight = torch.einsum("oi...,in->on...", weight, funnels.widening[self.in_space])
        if self.out_space is not None:
            narrowing = funnels.narrowing[self.out_space]
            weight = torch.einsum("no,oi...->ni...", narrowing, weight)
            bias = None if bias is None else narrowing @ bias
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.narrow_weight()
        if isinstance(self.wide, nn.Linear):
            return F.linear(x, weight, bias)
        conv = self.wide
        return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)  # type: ignore[arg-type]


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


class Funnelled(nn.Module):
    """A wide network whose planned layers run through funnels, and the funnels (one module, so an EMA or a
    checkpoint holds both)."""

    def __init__(self, network: nn.Module, funnels: Funnels) -> None:
        super().__init__()
        self.network, self.funnels = network, funnels

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.network(*args, **kwargs)


def funnel(wide: nn.Module, plan: FunnelPlan, funnels: Funnels) -> Funnelled:
    """A copy of `wide` whose planned layers run through the funnels (train it, then `merge`)."""
    network = copy.deepcopy(wide)
    for path, (in_space, out_space) in plan.layers.items():
        layer = network.get_submodule(path)
        if not isinstance(layer, FunnelledModule):
            raise TypeError(f"{path} is a {type(layer).__name__}; only Conv2d and Linear layers are funnelled")
        _set_module(network, path, FunnelledLayer(layer, funnels, in_space, out_space))
    return Funnelled(network, funnels)


@torch.no_grad()
def merge(funnelled: Funnelled, narrow: nn.Module) -> nn.Module:
    """Write the funnelled network's products into `narrow` (same layout, narrow widths); returns it.

    Every parameter and buffer outside the planned layers is copied too, so shapes must agree everywhere.
    """
    targets = dict(narrow.named_modules())
    funnelled_network = funnelled.network
    for path, module in funnelled_network.named_modules():
        if isinstance(module, FunnelledLayer):
            weight, bias = module.narrow_weight()
            target = targets[path]
            if target.weight.shape != weight.shape:
                raise ValueError(f"{path}: merged weight {tuple(weight.shape)} ≠ narrow {tuple(target.weight.shape)}")
            target.weight.copy_(weight)
            if bias is not None:
                target.bias.copy_(bias)
    planned = {p for p, m in funnelled_network.named_modules() if isinstance(m, FunnelledLayer)}
    sources = funnelled_network.state_dict()
    for name, tensor in narrow.state_dict(keep_vars=True).items():
        if name.rpartition(".")[0] in planned:
            continue
        source = sources.get(name)
        if source is None or source.shape != tensor.shape:
            raise ValueError(f"{name}: no same-shaped tensor in the funnelled network")
        tensor.data.copy_(source)
    return narrow


@torch.no_grad()
def widen(narrow: nn.Module, wide: nn.Module, plan: FunnelPlan, noise: float, generator: torch.Generator) -> nn.Module:
    """Fill `wide` so it computes what `narrow` does: narrow weights in the leading block, the new channels'
    writers small random (`noise`) and their readers zero. The new channels start silent, yet get gradients."""
    narrow_modules = dict(narrow.named_modules())
    for path, (in_space, _) in plan.layers.items():
        small, big = narrow_modules[path], wide.get_submodule(path)
        out_n, in_n = small.weight.shape[:2]
        big.weight.copy_(torch.randn(big.weight.shape, generator=generator) * noise)
        if in_space is not None:
            big.weight[:, in_n:] = 0
        big.weight[:out_n, :in_n] = small.weight
        if big.bias is not None:
            big.bias.zero_()
            big.bias[:out_n] = small.bias
    return wide
