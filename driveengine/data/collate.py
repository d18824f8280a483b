"""``collate_frames``: a list of :class:`~driveengine.data.stream.FrameStream` samples into one batch.

* numpy arrays of the same shape are stacked into one tensor (dtype kept: uint8 semantics, float16
  flow, bool masks, float64 poses);
* arrays of different shapes (``points``) become a list of tensors;
* Python ints, floats and bools become 1-D tensors; strings, lists, dicts and ``None`` stay Python
  lists (one entry per sample).

Tensors are put in pinned (page-locked) memory when ``pin_memory`` is true, by default when CUDA is
available and collation runs in the main process (workers leave pinning to the DataLoader's
``pin_memory=True``, which :meth:`FrameStream.loader` sets when CUDA is available).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info


def _stack(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, np.ndarray) and all(isinstance(v, np.ndarray) for v in values):
        if all(v.shape == first.shape and v.dtype == first.dtype for v in values):
            block = _common_block(values)
            if block is not None:  # consecutive frames decoded into one block: no copy
                owner = block.base  # a shared-memory tensor when decoded in a DataLoader worker
                return owner if isinstance(owner, torch.Tensor) else torch.from_numpy(block)
            out = np.empty((len(values), *first.shape), dtype=first.dtype)
            for i, v in enumerate(values):  # one copy per sample into the batch block
                out[i] = v
            return torch.from_numpy(out)
        return [torch.from_numpy(np.ascontiguousarray(v)) for v in values]
    if isinstance(first, (bool, np.bool_)) and all(isinstance(v, (bool, np.bool_)) for v in values):
        return torch.tensor(values, dtype=torch.bool)
    if isinstance(first, (int, np.integer)) and all(isinstance(v, (int, np.integer)) for v in values):
        return torch.tensor(values, dtype=torch.int64)
    if isinstance(first, (float, np.floating)) and all(isinstance(v, (float, np.floating)) for v in values):
        return torch.tensor(values, dtype=torch.float64)
    return list(values)


def _common_block(values: list[np.ndarray]) -> np.ndarray | None:
    """The array ``B`` with ``values[i] is B[i]`` in memory (the loader's decoded windows), else None."""
    base = values[0].base
    if not isinstance(base, np.ndarray) or base.ndim != values[0].ndim + 1 or len(base) != len(values):
        return None
    if not base.flags.c_contiguous or base.dtype != values[0].dtype:
        return None
    start = base.__array_interface__["data"][0]
    step = base.strides[0]
    for i, v in enumerate(values):
        if v.__array_interface__["data"][0] != start + i * step or not v.flags.c_contiguous:
            return None
    return base


def _pin(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, list):
        return [v.pin_memory() if isinstance(v, torch.Tensor) else v for v in value]
    return value


def collate_frames(samples: Sequence[dict[str, Any]], pin_memory: bool | None = None) -> dict[str, Any]:
    """Batch samples (dicts with the same keys) into a dict of tensors and lists (see the module docstring).

    Args:
        samples: the samples of one batch.
        pin_memory: pin the tensors; default: CUDA is available and this is not a DataLoader worker.

    Raises:
        ValueError: an empty batch, or samples with different keys.
    """
    if not samples:
        raise ValueError("collate_frames: empty batch")
    keys = list(samples[0])
    for s in samples[1:]:
        if list(s) != keys:
            raise ValueError(f"collate_frames: samples have different keys: {keys} vs {list(s)}")
    batch = {k: _stack([s[k] for s in samples]) for k in keys}
    if pin_memory is None:
        pin_memory = torch.cuda.is_available() and get_worker_info() is None
    if pin_memory:
        batch = {k: _pin(v) for k, v in batch.items()}
    return batch
