"""Run `hn-export ARGS` in process and return its exit code (tests that only need the code)."""

from __future__ import annotations

from hn_export.cli import main


def run_cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0
