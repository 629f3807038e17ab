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


_DTYPES = {"torch.float32": "float32", "torch.int64": "int64", "torch.int32": "int32",
           "torch.int8": "int8", "torch.uint8": "uint8"}


def buffer(t):
    """The core's raw-buffer descriptor (address, shape, strides, dtype, device) of a torch
    tensor; the bindings check it before any kernel reads it."""
    return core().Buffer(t.data_ptr(), list(t.shape), list(t.stride()), _DTYPES[str(t.dtype)],
                         str(t.device))
