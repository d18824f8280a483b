"""Pre-training on collected splits: the loop (:func:`~driveengine.train.loop.pretrain`, behind ``driveengine
pretrain``), its config (:mod:`~driveengine.train.config`), the loss (:mod:`~driveengine.train.loss`) and the
registered tasks that glue the stream to a model (:mod:`~driveengine.train.tasks`: ``lidar``, ``camera``).
The models live in :mod:`driveengine.models`, the metrics in :mod:`driveengine.evaluation.metrics`. Import the
submodules; this package imports nothing heavy.
"""
