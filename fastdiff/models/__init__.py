"""The models: the Ho et al. UNet (:mod:`~fastdiff.models.unet`, its norm+act and attention
pieces call the ops) and model folders (:mod:`~fastdiff.models.folders`, config.json +
safetensors, hash-checked), with the built-in digits model under ``weights/``.

May import: ops, schedulers, and the leaf modules (files, pause).
"""
