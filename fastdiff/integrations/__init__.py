"""Bridges to other libraries' models and schedulers (today: :mod:`fastdiff.integrations.diffusers`).

May import: ops, schedulers, models; never sampling (the Sampler uses them).
"""
