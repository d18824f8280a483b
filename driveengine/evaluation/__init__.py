"""Evaluation: OpenScene's occupancy and flow metrics (:mod:`~driveengine.evaluation.metrics`), used by
training and by ``driveengine evaluate`` (:mod:`~driveengine.evaluation.evaluate`, two label sets
compared frame by frame). Import the submodules; this package imports nothing heavy."""
