"""fastdiff's Triton kernels (installed as ``fastdiff.kernels``): one file per kernel, each with
its launcher and the configurations it can pick (``aot_specs``) for the ahead-of-time report."""
