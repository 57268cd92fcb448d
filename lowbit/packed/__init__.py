"""Packed weight formats, the inference module that holds them, and the checkpoint folder.

:mod:`.base` holds the protocol and the format table; each format module registers its class there with
``@register_format``.  Importing them here fills the table before any ``lowbit.packed`` module is used.
"""
from . import qweight, mixed, quipw, ggufw  # noqa: F401,I001  (each registers its format in base.FORMATS, in this order)
