"""Pre-training models: the image backbones and their registry (:mod:`~driveengine.models.backbones`:
ResNet, VoVNet-99), the occupancy heads every model ends with (:mod:`~driveengine.models.heads`), the LiDAR
and camera models, and the export of a trained backbone in the naming downstream code loads
(:mod:`~driveengine.models.export`). Each model is trained through a task registered in
:mod:`driveengine.train.tasks`. Import the submodules; this package imports nothing heavy."""
