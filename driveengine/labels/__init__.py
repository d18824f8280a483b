"""Label producers: the occupancy/flow/visibility generator (:mod:`~driveengine.labels.generator`, its
compiled kernels in :mod:`~driveengine.labels.voxel_ops`) and the importers of labels made by others
(OpenScene v1.0 sparse files: :mod:`~driveengine.labels.openscene_import`). Each writes one log's
``occ/<log>.zarr`` through :mod:`driveengine.store.occ`. Submodules are imported on demand.
"""
