"""Deploy the OpenAI-compatible server: ``ray job submit --working-dir . -- python jobs/serve.py MODEL [--detach]``.

Without ``--detach`` the job holds the application up until it is stopped (``ray job stop``: Serve shuts down);
with it the job deploys, waits until every replica is ready and exits, leaving the application running on the
cluster (``serve shutdown -y`` stops it). Runs as ``python jobs/serve.py`` too (a local Ray on 127.0.0.1, or
RAY_ADDRESS). Same options as ``distillery serve``.
"""

import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
