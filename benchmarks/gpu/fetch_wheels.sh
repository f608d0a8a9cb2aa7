#!/usr/bin/env bash
# Downloads (here, where pip reaches the registry) the wheels the GPU image lacks for the
# diffusers-dependent gpu tests: diffusers and importlib_metadata (its other needs are on the image:
# device tool, KINDS.md). They go to .whl/ (git-ignored); name `.whl` in the run's `carry`.
set -eu
cd "$(dirname "$0")/../.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
    --platform any -d .whl diffusers==0.42.1 importlib_metadata zipp
ls -l .whl
