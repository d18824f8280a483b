"""Streaming frames of a collected split into training: :class:`FrameStream` (a torch
``IterableDataset`` sharded over DDP ranks and DataLoader workers, shuffled per epoch, resumable, with
map-style access), :class:`MixedStream` (several splits mixed by weight: :mod:`driveengine.data.mix`) and
:func:`collate_frames`. What a sample holds is the field registry's business
(:mod:`driveengine.data.fields`, :func:`register_field`); which frames are streamed, the filters'
(:mod:`driveengine.data.filters`); the sampling plan lives in :mod:`driveengine.data.plan`.
"""

from driveengine.data.collate import collate_frames
from driveengine.data.fields import ArrayField, Field, SampleField, register_field
from driveengine.data.filters import FrameFilter
from driveengine.data.mix import UNIFIED_CLASSES, MixedStream, MixSource
from driveengine.data.stream import FrameStream, StreamError

__all__ = [
    "UNIFIED_CLASSES",
    "ArrayField",
    "Field",
    "FrameFilter",
    "FrameStream",
    "MixSource",
    "MixedStream",
    "SampleField",
    "StreamError",
    "collate_frames",
    "register_field",
]
