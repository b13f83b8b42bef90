"""Distill a teacher into a hybrid Mamba student: ``ray job submit --working-dir . -- python jobs/distill.py --config ...``.

Runs as ``python jobs/distill.py`` too (starts a local Ray on 127.0.0.1, or joins RAY_ADDRESS).
"""

import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
