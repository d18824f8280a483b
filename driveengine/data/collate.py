"""``collate_frames``: a list of :class:`~driveengine.data.stream.FrameStream` samples into one batch.

* numpy arrays of the same shape are stacked into one tensor (dtype kept: uint8 semantics, float16
  flow, bool masks, float64 poses);
* arrays of different shapes (``points``) become a list of tensors;
* Python ints, floats and bools become 1-D tensors; strings, lists, dicts and ``None`` stay Python
  lists (one entry per sample).

Tensors are put in pinned (page-locked) memory when ``pin_memory`` is true, by default when CUDA is
available and collation runs in the main process (workers leave pinning to the DataLoader's
``pin_memory=True``, which :meth:`FrameStream.loader` sets when CUDA is available).

Images streamed as uint8 (``FrameStream(image_dtype="uint8")``: a quarter of the bytes through the
loader) become the float32 [0, 1] images of the float path on the device with :func:`images_to_float`.
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


def images_to_float(
    images: torch.Tensor, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Camera images as floats in [0, 1] on ``device``: uint8 RGB 0..255 (``image_dtype="uint8"``) are moved
    first (a quarter of the bytes; ``non_blocking`` from pinned memory) and then divided by 255 there;
    floating-point images (the float path) are only moved and cast. In float32 the result equals what
    ``image_dtype="float32"`` streams, bit for bit.

    Args:
        images: (..., 3, H, W) uint8 or floating-point images (``images``, ``history_images`` of a batch).
        device: where to put them (None: where they are).
        dtype: the floating-point dtype wanted (float32; bfloat16/float16 for mixed precision).

    Raises:
        TypeError: images of another dtype, or a ``dtype`` that is not floating point.
    """
    if not dtype.is_floating_point:
        raise TypeError(f"images_to_float: dtype must be floating point, got {dtype}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"images_to_float: expected uint8 or floating-point images, got {images.dtype}")
    if device is not None:
        device = torch.device(device)
        non_blocking = device.type == "cuda" and images.device.type == "cpu" and images.is_pinned()
        images = images.to(device, non_blocking=non_blocking)
    if images.dtype == torch.uint8:
        return images.to(torch.float32).div_(255.0).to(dtype)
    return images.to(dtype)
