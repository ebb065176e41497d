"""``python -m promptkd.consolidate``: the command-line entry point of ``promptkd.training.consolidate``."""
import sys

from promptkd.training.consolidate import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
