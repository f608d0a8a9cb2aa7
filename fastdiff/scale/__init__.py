"""Scale-out: sharded sampling of N images, resumable and the same whatever the world size
(:mod:`~fastdiff.scale.shards`), over torch.distributed (:mod:`~fastdiff.scale.distributed`).

May import: sampling and everything below it.
"""
