"""Pre-training on collected splits: the reusable :class:`~driveengine.models.resnet.ResNet`, the LiDAR-to-
occupancy model (:mod:`~driveengine.models.lidar`), its loss, the training loop
(:func:`~driveengine.train.loop.pretrain`, behind ``driveengine pretrain``) and the OpenScene metrics
(:mod:`~driveengine.evaluation.metrics`). Import the submodules; this package imports nothing heavy.
"""
