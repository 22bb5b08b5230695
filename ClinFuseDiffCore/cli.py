"""The ``clinfusediff`` command. Thin: parses arguments and calls the modules that do the work.

Each subcommand lives in ``ClinFuseDiffCore/commands/<name>.py`` with ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; those modules import nothing heavy at the
top, so ``clinfusediff --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

# Order shown in --help. A name whose module does not exist yet is skipped.
SUBCOMMANDS = ["demo", "synth", "preprocess", "train", "evaluate", "experiment", "infer", "benchmark", "realdata"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="clinfusediff",
        description="Diffusion-based multimodal fusion with test-time training.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"ClinFuseDiffCore.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"ClinFuseDiffCore.commands.{name}":
                continue
            raise
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP))
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # User-facing errors (bad config, bad input, missing files) end with a clear message and
        # a non-zero exit instead of a traceback. Set CLINFUSEDIFF_DEBUG=1 for the traceback.
        import os

        if os.environ.get("CLINFUSEDIFF_DEBUG"):
            raise
        print(f"clinfusediff {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        # A fault of the machine (disk full, read-only folder, no permission, I/O error) that no
        # lower layer named: one line with the path and the fix (utils.environment_fault).
        import os

        from .utils import environment_fault, is_environment_fault

        if not is_environment_fault(e) or os.environ.get("CLINFUSEDIFF_DEBUG"):
            raise
        print(f"clinfusediff {args.command}: error: {environment_fault(e, 'access')}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
