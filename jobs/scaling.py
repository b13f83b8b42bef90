"""The IsoFLOP scaling sweep + Chinchilla fits: ``ray job submit --working-dir . -- python jobs/scaling.py --config ...``.

Runs as ``python jobs/scaling.py`` too (starts a local Ray on 127.0.0.1, or joins RAY_ADDRESS). Run it again with
the same ``output`` to resume an interrupted sweep. Refit a saved table offline: ``distillery scaling fit RUNS``.
"""

import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["scaling", "sweep", *sys.argv[1:]]))
