"""Loads the compiled extension `nanochat._C` once, with an actionable error."""

from __future__ import annotations

import functools
import importlib


@functools.cache
def core():
    try:
        return importlib.import_module("nanochat._C")
    except ImportError as e:  # pragma: no cover - only on broken installs
        raise ImportError(
            "nanochat's compiled core (nanochat._C) is missing or failed to load: "
            f"{e}. Reinstall with `pip install .` from the source tree."
        ) from e
