"""`streamedit <command>`: dispatches to the service, the engine builder and the load tester."""

from __future__ import annotations

import sys

COMMANDS = {
    "serve": "run the service (see `streamedit serve --help`)",
    "build-engine": "export ONNX graphs and build TensorRT engines for a model",
    "loadtest": "open N WebRTC sessions against a running server and report",
    "fleet": "run N replicas behind nginx (routing by replica) with a coturn relay, on this machine",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: streamedit <command> [options]\n\ncommands:")
        for name, text in COMMANDS.items():
            print(f"  {name:14s} {text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from server.cli import serve

        return serve(rest)
    if command == "build-engine":
        from engines.build import main as build_main

        return build_main(rest)
    if command == "fleet":
        from fleet.local import main as fleet_main

        return fleet_main(rest)
    from loadtest.cli import main as loadtest_main

    return loadtest_main(rest)


if __name__ == "__main__":
    sys.exit(main())
