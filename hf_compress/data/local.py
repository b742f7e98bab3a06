"""Where local stand-ins for Hub datasets live: the one place every data loader asks."""

from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    """`$HF_COMPRESS_DATA` when set, else `shared/data` beside the repository of a development checkout.

    Read at call time, so setting the variable after import takes effect.
    """
    env = os.environ.get("HF_COMPRESS_DATA")
    if env:
        return Path(env)
    # hf_compress/data/local.py -> the folder that holds the checkout
    return Path(__file__).resolve().parents[3] / "shared" / "data"
