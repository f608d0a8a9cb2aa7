"""What runs a model fast: torch.compile settings (:mod:`~fastdiff.engines.inductor`), CUDA-graph
capture per shape (:mod:`~fastdiff.engines.cuda_graphs`), OpenVINO on a CPU
(:mod:`~fastdiff.engines.openvino`) and the memory estimate (:mod:`~fastdiff.engines.memory`).

May import: ops (dispatch) and torch; never the samplers that use them.
"""
