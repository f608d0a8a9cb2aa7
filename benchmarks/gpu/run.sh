#!/usr/bin/env bash
# The first GPU run in one command (benchmarks/gpu/README.md): run from anywhere; works from the bare
# tree (PYTHONPATH, no install). Wheels in .whl/ (benchmarks/gpu/fetch_wheels.sh; carried by the
# device tool when `carry` names .whl; FASTDIFF_WHEELS names another folder) are installed into a
# temporary folder on the path: diffusers, for its gpu tests.
#   benchmarks/gpu/run.sh "$OUT"            all stages, about 8 minutes on a GPU (a relative OUT is taken
#                                           from the repository root)
#   benchmarks/gpu/run.sh out/gpu --dry-run the plan and the imports, seconds, any machine
#   benchmarks/gpu/run.sh out/gpu --tiny    every stage at a tiny size (the CPU check)
set -u
cd "$(dirname "$0")/../.." || exit 2
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python=${PYTHON:-python3}
wheels=${FASTDIFF_WHEELS:-.whl}
if compgen -G "$wheels/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/fastdiff-wheels.XXXXXX)
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl \
        && export PYTHONPATH="$PYTHONPATH:$site" \
        || echo "run.sh: the wheels in $wheels/ did not install; running without them" >&2
fi
exec "$python" -m fastdiff.bench.gpu_run "$@"
