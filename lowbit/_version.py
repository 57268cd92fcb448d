"""The package version, in one place (imported by :mod:`lowbit` and :mod:`lowbit.api` without a cycle)."""
__version__ = "0.1.0"
