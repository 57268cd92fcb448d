"""``python -m lowbit.kernels``: build every kernel and print which are available and why not."""
import sys

from .dispatch import main

if __name__ == "__main__":
    sys.exit(main())
