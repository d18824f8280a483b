"""Pictures of the dataset: BEV images of occupancy, flow and boxes (:mod:`driveengine.viz.bev`).

Plotting needs the ``viz`` extra (matplotlib; ``pip install driveengine[viz]``) and the 3D view the
``o3d`` extra; importing this package needs neither.
"""
