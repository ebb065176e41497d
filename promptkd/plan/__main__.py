"""``python -m promptkd.plan --config X.yaml key=value ...``: the same as ``launcher/main.py ... stage=plan``."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    sys.path.insert(0, os.path.join(REPO, "launcher"))
    from main import main  # launcher/main.py

    sys.exit(main(sys.argv[1:] + ["stage=plan"]))
