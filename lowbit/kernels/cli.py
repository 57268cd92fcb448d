"""Subcommand ``lowbit kernels`` (registered through ``lowbit.cli._EXTENSIONS``): build every compiled kernel
and print one line per kernel — name, available yes/no, and the paths compiled in or why not.  The same as
``python -m lowbit.kernels``.  Importing this module does not import torch."""
from __future__ import annotations

import argparse


def cmd_kernels(a: argparse.Namespace) -> int:
    from .dispatch import main

    return main()


def register(sub) -> None:
    k = sub.add_parser("kernels", help="build the C++ kernels now and print which are available and why not")
    k.set_defaults(func=cmd_kernels)
