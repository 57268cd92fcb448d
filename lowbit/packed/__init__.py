"""Packed weight formats, the inference module that holds them, and the checkpoint folder."""
