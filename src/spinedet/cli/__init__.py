"""The ``spinedet`` command line: one entry point, a sub-command per job.

Every command lives in a module of this package (``info``, ``data``, ``engine``, ``convert``,
``export``) that adds its sub-parsers; the library code it calls lives outside. A command
reports a :class:`~spinedet.errors.SpinedetError` (or an unreadable file) as one line and a
non-zero exit; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from .. import __version__
from ..errors import SpinedetError, Stopped


class _Parser(argparse.ArgumentParser):
    """Every (sub-)command's ``--help`` shows the options' defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from .config import add_config_commands
    from .convert import add_convert_commands
    from .data import add_data_commands
    from .engine import add_engine_commands
    from .export import add_export_commands
    from .info import add_info_commands

    parser = _Parser(
        prog="spinedet", description="SpineNet detectors: train, evaluate, predict, export."
    )
    parser.add_argument("--version", action="version", version=f"spinedet {__version__}")
    # What a stop by SIGINT/SIGTERM that no code below explains leaves (see main).
    parser.set_defaults(uses_torch=True, stopped="interrupted")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_info_commands(sub)
    add_data_commands(sub)
    add_engine_commands(sub)
    add_config_commands(sub)
    add_convert_commands(sub)
    add_export_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # SIGTERM stops as Ctrl-C does, from before the parser and torch load (the first seconds):
    # one line and the command's own clean-up instead of a silent kill.
    previous = signal.signal(signal.SIGTERM, _stop)
    args = argparse.Namespace(stopped="interrupted")
    try:
        args = build_parser().parse_args(argv)
        # spinedet's own progress at INFO; other libraries (ONNX export, TensorBoard) stay quiet.
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("spinedet").setLevel(logging.INFO)
        if args.uses_torch:  # the data commands that need no torch do not wait ~5 s to load it
            from ..engine.runtime import configure_cpu_threads

            configure_cpu_threads()
        return args.func(args)
    except (SpinedetError, OSError) as e:
        # SPINEDET_DEBUG=1 shows the traceback.
        if os.environ.get("SPINEDET_DEBUG"):
            raise
        print(f"spinedet: error: {e}", file=sys.stderr)
        _tell_launcher(f"spinedet: error: {e}")
        return 2
    except KeyboardInterrupt as e:
        print(f"spinedet: {str(e) or args.stopped}", file=sys.stderr)
        return 128 + (e.signum if isinstance(e, Stopped) else signal.SIGINT)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tell_launcher(message: str) -> None:
    """Under torchrun, write ``message`` to the error file it gives each process: its summary
    of the failed ranks (``ChildFailedError``, the last lines of the log) then shows the error
    instead of a link on how to get a traceback."""
    if path := os.environ.get("TORCHELASTIC_ERROR_FILE"):
        with contextlib.suppress(OSError):  # the one-line error is printed already
            with open(path, "w") as f:
                # Indented as torchrun indents a traceback there.
                text = message.replace("\n", "\n  ")
                json.dump({"message": text, "timestamp": int(time.time())}, f)


def _stop(signum: int, frame: Any) -> None:
    raise Stopped(signum=signum)


if __name__ == "__main__":
    sys.exit(main())
