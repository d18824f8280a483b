"""Pre-training on collected splits: the reusable :class:`~driveengine.train.resnet.ResNet`, the LiDAR-to-
occupancy model (:mod:`~driveengine.train.model_lidar`), its loss, the training loop
(:func:`~driveengine.train.loop.pretrain`, behind ``driveengine pretrain``) and the OpenScene metrics
(:mod:`~driveengine.train.metrics`). Import the submodules; this package imports nothing heavy.
"""
