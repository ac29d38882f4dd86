"""``python -m workers``: one worker process, configured by ``ALIGNQ_*`` environment variables."""

from __future__ import annotations

import logging
import sys

from workers.process import run_worker
from workers.settings import WorkerSettings


def main() -> int:
    settings = WorkerSettings()
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_worker(settings)


if __name__ == "__main__":
    sys.exit(main())
