"""``python -m analytic_diffusion``: the same command line as ``analytic-diffusion``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
