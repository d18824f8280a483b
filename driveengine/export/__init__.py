"""``driveengine export``: a collected split in other tools' formats (OpenScene v1.1 metadata pickles and
v1.0 occupancy files: :mod:`~driveengine.export.openscene`)."""
