"""Streaming frames of a collected split into training: :class:`FrameStream` (a torch
``IterableDataset`` sharded over DDP ranks and DataLoader workers, shuffled per epoch, resumable) and
:func:`collate_frames`. The sampling plan lives in :mod:`driveengine.data.plan`.
"""

from driveengine.data.collate import collate_frames
from driveengine.data.stream import FrameStream, StreamError

__all__ = ["FrameStream", "StreamError", "collate_frames"]
