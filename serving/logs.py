"""Log lines from our own loggers in every replica.

Ray Serve sets up its `ray.serve` logger only; ours (`model.*` at load, `pixtral_serve.*` per
request) would otherwise print nothing below WARNING. One stderr handler each, at INFO, lands in
the replica's log file like Serve's own lines.
"""

from __future__ import annotations

import logging

OUR_LOGGERS = ("model", "pixtral_serve")


def setup_logging(level: int = logging.INFO) -> None:
    for name in OUR_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(getattr(h, "_pixtral_serve", False) for h in logger.handlers):
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s"))
            handler._pixtral_serve = True  # idempotent across deployments in one process
            logger.addHandler(handler)
            logger.propagate = False
