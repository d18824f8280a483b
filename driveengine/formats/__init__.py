"""Other people's file formats that DriveEngine both reads and writes: OpenScene v1.0 sparse label files
(:mod:`~driveengine.formats.openscene_labels`) and pickles that numpy-1 consumers load
(:mod:`~driveengine.formats.pickles`). DriveEngine's own format is owned by :mod:`driveengine.store`.
"""
