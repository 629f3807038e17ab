"""Loads the compiled extension `nanochat._C` once, with an actionable error."""

from __future__ import annotations

import functools
import importlib

import numpy as np


@functools.cache
def core():
    try:
        return importlib.import_module("nanochat._C")
    except ImportError as e:  # pragma: no cover - only on broken installs
        raise ImportError(
            "nanochat's compiled core (nanochat._C) is missing or failed to load: "
            f"{e}. Reinstall with `pip install .` from the source tree."
        ) from e



_DTYPES = ("float32", "bfloat16", "int8", "uint8", "int32", "int64")  # what the bindings take


def buffer(a, name: str = "array"):
    """Describe a torch tensor or numpy array to the core: address, shape, element strides,
    dtype, device (csrc/bindings/buffer.h checks it before any kernel reads it). Tensors are
    recognized by duck typing so that this module, and the engine, never import torch."""
    if isinstance(a, np.ndarray):
        if a.dtype.name not in _DTYPES:
            raise TypeError(f"{name}: unsupported dtype {a.dtype}")
        if any(s % a.itemsize for s in a.strides):
            raise ValueError(f"{name}: strides {a.strides} are not whole elements")
        strides = [s // a.itemsize for s in a.strides]
        return core().Buffer(a.ctypes.data, list(a.shape), strides, a.dtype.name, "cpu")
    if hasattr(a, "data_ptr") and hasattr(a, "stride"):  # a torch.Tensor
        dtype = str(a.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise TypeError(f"{name}: unsupported dtype {a.dtype}")
        return core().Buffer(a.data_ptr(), list(a.shape), list(a.stride()), dtype, str(a.device))
    raise TypeError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(a).__name__}")
