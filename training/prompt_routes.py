"""Builds a model folder's prompt routing table (engines.routing) from the edits' phrasings, and measures it.

The table's phrasings are every edit's training phrasings (phrasings.json) plus the wider ones of
ROUTING_PHRASINGS_FILE, which only routing reads; the held-out phrasings of phrasings.json and the evaluation's
unseen phrasings are never in it (tests check both). Each edit is fed to the UNet as the mean of its training
phrasings' contexts, a blend the distilled students were trained on (context mixing).

    python -m training.prompt_routes --model engines/default_model           # write the table, route the model
    python -m training.prompt_routes --model engines/default_model --measure # accuracy only, nothing written

A folder whose table holds tuned contexts (training.pixel_finetune) keeps them when its phrasings are rebuilt,
unless --reset-contexts.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from engines.config import POOLED_ENCODER, ROUTES_FILE, EditorConfig, PromptRouting
from engines.model import load_base_prompt_encoder
from engines.routing import PHRASING_MEANS, RouteTable, edit_weights, sentence_embeddings
from engines.text import PromptEncoder
from training.edits import Edit, get_edits
from training.prompts import encode_in_batches

#: Phrasings only routing reads: written for it without sight of the evaluation's unseen phrasings.
ROUTING_PHRASINGS_FILE = Path(__file__).with_name("routing_phrasings.json")


def load_routing_phrasings(path: Path = ROUTING_PHRASINGS_FILE) -> dict[str, tuple[str, ...]]:
    """Each edit's routing-only phrasings (lower case, distinct), checked against the edits' names."""
    data = json.loads(path.read_text()).get("phrasings")
    if not isinstance(data, dict):
        raise ValueError(f"{path} needs a 'phrasings' object: edit name -> list of phrasings")
    known = {e.name for e in get_edits()}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"{path}: unknown edits {sorted(unknown)}")
    out = {}
    for name, phrasings in data.items():
        if len(set(phrasings)) != len(phrasings) or not all(p.strip() for p in phrasings):
            raise ValueError(f"{path}: {name} has repeated or empty phrasings")
        out[name] = tuple(phrasings)
    return out


def route_phrasings(edits: tuple[Edit, ...], extra: dict[str, tuple[str, ...]]) -> list[tuple[str, int]]:
    """(phrasing, edit index) of the table: training phrasings, then routing-only ones, without repeats."""
    seen: dict[str, int] = {}
    for i, edit in enumerate(edits):
        for p in (*edit.phrasings, *extra.get(edit.name, ())):
            seen.setdefault(p, i)
    return list(seen.items())


def build_route_table(edits: tuple[Edit, ...], extra: dict[str, tuple[str, ...]], encoder: PromptEncoder) -> RouteTable:
    """The table of `edits` (their training phrasings and `extra`'s), encoded by the model's own prompt encoder."""
    pairs = route_phrasings(edits, extra)
    contexts = encode_in_batches(encoder, [p for p, _ in pairs])
    labels = torch.tensor([i for _, i in pairs])
    own = [set(edit.phrasings) for edit in edits]
    trained = torch.tensor([p in own[i] for p, i in pairs])
    edit_contexts = torch.stack([contexts[(labels == i) & trained].mean(0) for i in range(len(edits))])
    return RouteTable(sentence_embeddings(contexts), labels, tuple(e.name for e in edits), edit_contexts)


def routing_accuracy(
    table: RouteTable, routing: PromptRouting, encoder: PromptEncoder, prompts: dict[str, tuple[str, ...]]
) -> tuple[int, int, list[str]]:
    """(right, total, misrouted lines) when each prompt is routed to its heaviest edit."""
    names = list(table.edit_names)
    flat = [(p, name) for name, ps in prompts.items() for p in ps]
    weights = edit_weights(sentence_embeddings(encode_in_batches(encoder, [p for p, _ in flat])), table, routing)
    wrong = []
    for (prompt, name), w in zip(flat, weights, strict=True):
        top = int(w.argmax())
        if names[top] != name:
            wrong.append(f"{name}: {prompt!r} -> {names[top]} ({float(w[top]):.2f})")
    return len(flat) - len(wrong), len(flat), wrong


def leave_one_out_accuracy(
    table: RouteTable, edits: tuple[Edit, ...], extra: dict[str, tuple[str, ...]], routing: PromptRouting
) -> tuple[int, int]:
    """Each routing-only phrasing of `table` (built from `edits` and `extra`) routed by the table without it: how
    well the table reads wordings it does not hold."""
    trained = {p for e in edits for p in e.phrasings}
    right = total = 0
    for j, (p, i) in enumerate(route_phrasings(edits, extra)):
        if p in trained:
            continue
        keep = torch.arange(len(table.phrasings)) != j
        without = RouteTable(table.phrasings[keep], table.edit_of_phrasing[keep], table.edit_names, table.edit_contexts)
        right += int(edit_weights(table.phrasings[j : j + 1], without, routing).argmax()) == i
        total += 1
    return right, total


def require_sentence_contexts(config: EditorConfig, folder: Path) -> None:
    if config.prompt_encoder != POOLED_ENCODER:
        raise ValueError(f"{folder} reads '{config.prompt_encoder}' contexts; routing needs '{POOLED_ENCODER}'")


def keep_tuned_contexts(folder: Path, table: RouteTable, reset: bool) -> RouteTable:
    """`table` with the contexts of the folder's current table where those were tuned (training.pixel_finetune),
    unless `reset`: new phrasings must not silently undo a training run."""
    path = folder / ROUTES_FILE
    if reset or not path.is_file():
        return table
    current = RouteTable.load(path)
    if current.contexts_source == PHRASING_MEANS:
        return table
    if current.edit_names != table.edit_names:
        raise ValueError(
            f"{path}'s contexts were {current.contexts_source}, for other edits than today's: "
            "pass --reset-contexts to replace them with phrasing means"
        )
    print(f"kept the table's contexts ({current.contexts_source}); --reset-contexts rebuilds them")
    return replace(table, edit_contexts=current.edit_contexts, contexts_source=current.contexts_source)


def route_model(folder: Path, table: RouteTable, routing: PromptRouting) -> None:
    """Write `table` into the model folder and turn routing on in its editor.json."""
    config = EditorConfig.load(folder)
    require_sentence_contexts(config, folder)
    table.save(folder / ROUTES_FILE)
    config.model_copy(update={"prompt_routing": routing}).save(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model folder (editor.json, unet/, ...)")
    parser.add_argument("--phrasings", type=Path, default=ROUTING_PHRASINGS_FILE, help="routing-only phrasings")
    parser.add_argument("--top-k", type=int, default=PromptRouting().top_k)
    parser.add_argument("--temperature", type=float, default=PromptRouting().temperature)
    parser.add_argument("--measure", action="store_true", help="print accuracies, write nothing")
    parser.add_argument(
        "--reset-contexts",
        action="store_true",
        help="write the edits' contexts as phrasing means even where the folder's table holds tuned ones",
    )
    args = parser.parse_args(argv)
    try:
        routing = PromptRouting(top_k=args.top_k, temperature=args.temperature)
        if not (args.model / "unet" / "config.json").is_file():
            raise ValueError(f"{args.model} is not a model folder (no unet/config.json)")
        config = EditorConfig.load(args.model)
        extra = load_routing_phrasings(args.phrasings)
        require_sentence_contexts(config, args.model)
    except (OSError, ValueError) as exc:
        print(f"prompt_routes: {exc}", file=sys.stderr)
        return 2
    encoder = load_base_prompt_encoder(config, args.model)
    edits = get_edits()
    table = build_route_table(edits, extra, encoder)
    held_out = {e.name: e.held_out for e in edits}
    right, total, wrong = routing_accuracy(table, routing, encoder, held_out)
    print(f"held-out phrasings (phrasings.json) routed right: {right}/{total}")
    for line in wrong:
        print("  " + line)
    loo_right, loo_total = leave_one_out_accuracy(table, edits, extra, routing)
    print(f"routing-only phrasings, each left out of the table: {loo_right}/{loo_total}")
    if not args.measure:
        try:
            table = keep_tuned_contexts(args.model, table, args.reset_contexts)
        except ValueError as exc:
            print(f"prompt_routes: {exc}", file=sys.stderr)
            return 2
        try:
            route_model(args.model, table, routing)
        except OSError as exc:
            print(f"prompt_routes: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.model / ROUTES_FILE} ({len(table.phrasings)} phrasings) and routing in editor.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
