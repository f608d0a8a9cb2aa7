"""Training a model (:mod:`~fastdiff.training.trainer`: resumable, DDP) on image data
(:mod:`~fastdiff.training.data`: the digits data set, image folders).

May import: ops, schedulers, models, scale.distributed.
"""
