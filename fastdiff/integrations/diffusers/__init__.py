"""diffusers -> fastdiff: ``accelerate()`` (module replacement, :mod:`.accelerate`), the fused
modules (:mod:`.modules`), the fused scheduler steps and the scheduler -> StepTable bridge
(:mod:`.schedulers`), and the one place that knows diffusers' classes (:mod:`.types`).

May import: ops, schedulers, models; diffusers itself only lazily (it is optional).
"""
