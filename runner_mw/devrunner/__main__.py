"""``python -m runner_mw.devrunner``: run the development stand-in runner (see ``server.main``)."""

from __future__ import annotations

import sys

from runner_mw.devrunner.server import main

if __name__ == "__main__":
    sys.exit(main())
