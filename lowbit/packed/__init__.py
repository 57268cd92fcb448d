"""Packed weight formats, the inference module that holds them, and the checkpoint folder."""

# The format table first: the format modules (mixed, quipw, ggufw) import helpers from qweight, which registers
# them at its end, so whichever module is imported first, qweight must be initialised before them.
from . import qweight  # noqa: E402,F401
