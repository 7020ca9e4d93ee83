"""The ``pyfff`` command line (also ``python -m pyfff``).

Each subcommand lives in its own module and registers itself through
``add_parser(subparsers)``, which returns nothing and sets ``func`` on the
subparser; ``func(args)`` returns the exit status.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand modules, in --help order; each defines add_parser(subparsers)
_COMMAND_MODULES = ["pyfff._cli_bench", "pyfff._cli_encoder"]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="pyfff",
        description="Fast feedforward (FFF / UltraFastBERT) inference on the CPU.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    cfg = sub.add_parser("config", help="show the build and runtime configuration (pyfff.show_config())",
                         description="Print pyfff's version, whether OpenMP is on and which runtime, the default thread "
                                     "count, the SIMD variant of the FFF kernels, the int8 code paths this CPU runs "
                                     "and the BLAS NumPy uses (what pyfff.show_config() prints).")
    cfg.set_defaults(func=lambda args: (__import__("pyfff").show_config(), 0)[1])
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # that part of the CLI is not built yet
        module.add_parser(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from pyfff import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader went away (`pyfff info M --json | head`): stop quietly, as a shell tool does, and keep
        # Python from reporting the same error again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    return status


if __name__ == "__main__":
    sys.exit(main())
