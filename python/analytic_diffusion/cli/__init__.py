"""The ``analytic-diffusion`` command line (also ``python -m analytic_diffusion``).

Subcommands, one module each:

- ``demo`` (:mod:`.demo`): the whole pipeline on bundled natural-image crops -
  moments, Wiener filter, locality masks, samples from all four denoisers - written
  as a grid figure, a figure of locality maps and a JSON summary with timings.
- ``stats`` (:mod:`.stats`): full or patch moments of a dataset to a safetensors file.
- ``sample`` (:mod:`.sample`): samples from one denoiser on the user's data, as a
  PNG grid and a uint8 ``.npy``.
- ``locality`` (:mod:`.locality`): Wiener sensitivity fields and locality-mask
  windows of chosen pixels across timesteps, as figures and a JSON/markdown table;
  optionally a trained network's fields beside them.
- ``compare`` (:mod:`.compare`): analytical denoisers (published presets with ``--preset``)
  against a trained network (``--model MODULE:CLASS --checkpoint FILE``, or a diffusers
  UNet2DModel folder) under the protocols of docs/algorithms.md §8.2, written as a run
  folder (config.json, metrics.json, table.md, figures, samples).
- ``reproduce`` (:mod:`.reproduce`): trains a small UNet on bundled crops (or loads one)
  and compares every analytical denoiser with it, as a run folder (docs/reproduction.md).

Errors. User errors - bad arguments, unreadable or unusable input files and data,
a network that fails, a missing device, an unwritable output (OSError), running out
of memory - are reported as ``analytic-diffusion: error: <message>`` with exit
status 2, like argparse's own usage errors, without a traceback. They reach
:func:`main` as :class:`CLIError` (raised by the commands, or converted from the
library's ValueError/TypeError inside the stages that read the user's input, see
:func:`.common.user_input`). Every other exception is a bug and propagates with its
traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import compare, demo, locality, reproduce, sample, stats
from .common import PROG, CLIError

__all__ = ["CLIError", "PROG", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Analytical (training-free) diffusion denoisers: locality (full or windowed statistics), Wiener, optimal and nearest.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in (demo, stats, sample, locality, compare, reproduce):
        command.add_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0 on success, 2 on a user error (printed as ``analytic-diffusion: error: ...``),
    130 on Ctrl-C. Any other exception propagates (a bug: the traceback is wanted).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help and usage errors: keep argparse's message, return its status
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return int(args.func(args) or 0)
    except (CLIError, OSError, MemoryError) as e:
        # OSError: missing inputs, unwritable outputs, a full disk - the environment, not a bug
        print(f"{PROG}: error: {str(e) or type(e).__name__}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
