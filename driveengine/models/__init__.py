"""Pre-training models: the image backbones and their registry (:mod:`~driveengine.models.backbones`:
ResNet, VoVNet-99), the occupancy heads, the LiDAR and camera models, and the export of a trained
backbone in the naming downstream code loads (:mod:`~driveengine.models.export`). Import the
submodules; this package imports nothing heavy."""
