"""``collect``: nuPlan logs / OpenScene metadata into per-log frame shards and occupancy labels.

* :mod:`driveengine.collect.frames`: key frames and frame rows (Arrow, ``schemas/frame.py``);
* :mod:`driveengine.labels.generator`: occupancy and flow labels (Zarr);
* :mod:`driveengine.collect.job`: the per-log job (read, rows, labels, atomic commit);
* :mod:`driveengine.collect.runner`: planning, schedulers (in-process, process pool, Dask), manifest,
  summary (``driveengine collect``).

Submodules are imported on demand (nothing heavy happens on ``import driveengine.collect``).
"""
