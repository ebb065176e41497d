"""``python -m promptkd.compare``: the command-line entry point of ``promptkd.evaluation.compare``."""
import sys

from promptkd.evaluation.compare import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
