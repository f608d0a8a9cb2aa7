"""``fastdiff bench``: sampling speed of fastdiff against the reference loop, torch.compile and diffusers.

- :mod:`~fastdiff.bench.harness`: settings, the interleaved timing rounds, the result dict;
- :mod:`~fastdiff.bench.paths`: the compared execution paths, each built lazily (a missing piece skips one);
- :mod:`~fastdiff.bench.diffusers_peer`: fastdiff UNet -> diffusers UNet2DModel, and noise replay;
- :mod:`~fastdiff.bench.roofline`: FLOP counting and the device's measured roof;
- :mod:`~fastdiff.bench.telemetry`: NVML / CPU sampling during each call;
- :mod:`~fastdiff.bench.environment`: versions, hardware, commit, command line;
- :mod:`~fastdiff.bench.report`: markdown, JSON, PNG, and the benchmarks/README.md tables;
- :mod:`~fastdiff.bench.fidelity` / :mod:`~fastdiff.bench.quality`: sample quality (FD in a
  digits feature space) and speed at equal quality; :mod:`~fastdiff.bench.traffic`: kernels per step.

May import: anything in the library (it measures all of it), never the command line.
"""
