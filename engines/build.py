"""The `streamedit build-engine` command: export a model folder's ONNX graphs and build its TensorRT engines."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engines.backends.base import BackendUnavailable
from engines.export import GRAPH_NAMES, export_onnx, onnx_folder
from engines.model import DEFAULT_MODEL_DIR, EditorModel, ModelFolderError
from engines.spec import DEFAULT_MAX_BATCH


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamedit build-engine",
        description="Export the editor's ONNX graphs (TAESD encoder, guided UNet, TAESD decoder) for a model "
        "folder and build fp16 TensorRT engines from them where TensorRT and a CUDA GPU are present. "
        "Both land in the cache the server reads, keyed by the weights' hash and the frame size.",
    )
    parser.add_argument(
        "model", nargs="?", type=Path, default=None, help="model folder (default: the shipped default model)"
    )
    parser.add_argument("--taesd", type=Path, default=None, help="a TAESD folder to use instead of the model's own")
    parser.add_argument("--resolution", type=int, default=None, help="square frame side (default: the model's)")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help=f"largest batch the TensorRT engines take (default {DEFAULT_MAX_BATCH}, as `streamedit serve`)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (default: $STREAMEDIT_CACHE_DIR or ~/.cache/streamedit)",
    )
    parser.add_argument(
        "--tensorrt",
        choices=("auto", "require", "skip"),
        default="auto",
        help="auto: build engines where TensorRT and CUDA are present; require: fail without them; skip: ONNX only",
    )
    parser.add_argument("--device", default="cuda", help="CUDA device to build the engines for (default: cuda)")
    return parser


def _quiet_libraries() -> None:
    """diffusers and transformers advise on every load (accelerate, unused config keys); a CLI shows only errors."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status: 0 done, 1 TensorRT required but unavailable or failed, 2 bad input."""
    parser = _parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    if args.resolution is not None and (args.resolution < 64 or args.resolution % 8):
        parser.error(f"--resolution must be a multiple of 8 and at least 64, got {args.resolution}")
    if args.max_batch < 1:
        parser.error(f"--max-batch must be at least 1, got {args.max_batch}")
    if args.tensorrt == "require":  # fail before the slow export, not after it
        from engines.backends.tensorrt_backend import import_tensorrt, require_cuda

        try:
            import_tensorrt()
            require_cuda()
        except BackendUnavailable as exc:
            _error(f"TensorRT engines cannot be built here: {exc}")
            return 1
    folder = args.model or DEFAULT_MODEL_DIR
    try:
        model = EditorModel.from_pretrained(folder, taesd=args.taesd)
    except (ModelFolderError, OSError) as exc:
        _error(f"cannot load a model from {folder}: {exc}")
        return 2
    resolution = args.resolution or model.config.resolution
    print(f"model: {folder} (fingerprint {model.fingerprint}, {resolution}px)")

    cached = onnx_folder(model, resolution, args.cache_dir).complete()
    graphs = export_onnx(model, resolution, args.cache_dir)
    print(f"ONNX graphs: {graphs.folder}{' (cached)' if cached else ''}")
    for name in GRAPH_NAMES:
        path = graphs.path(name)
        print(f"  {path.name}  {path.stat().st_size / 1e6:.1f} MB")

    if args.tensorrt == "skip":
        print("TensorRT engines: skipped (--tensorrt skip)")
        return 0
    try:
        from engines.backends.tensorrt_backend import build_engines

        engines = build_engines(model, resolution, args.max_batch, args.cache_dir, args.device)
    except BackendUnavailable as exc:
        if args.tensorrt == "require":
            _error(f"TensorRT engines cannot be built here: {exc}")
            return 1
        print(f"TensorRT engines: not built ({exc})")
        return 0
    except RuntimeError as exc:  # a parse or build failure, already explained in TensorRT's log
        _error(str(exc))
        return 1
    print(f"TensorRT engines: {engines} (batch 1..{args.max_batch})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
