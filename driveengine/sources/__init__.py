"""Readers of inputs. Each yields the same columnar :class:`~driveengine.sources.logdata.LogData`."""

from driveengine.sources.logdata import LogData

__all__ = ["LogData"]
