"""Where rqgen keeps what it builds once and reuses (e.g. the digit classifier)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$RQGEN_CACHE, else ~/.cache/rqgen."""
    return Path(os.environ.get("RQGEN_CACHE", Path.home() / ".cache" / "rqgen"))
