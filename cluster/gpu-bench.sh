#!/usr/bin/env bash
# The GPU benchmark of #25 in one run, for a lent GPU machine (no network; python3 there has
# torch with CUDA, transformers and huggingface-hub, but not Ray, diffusers, FastAPI or pydantic).
#
# Before, HERE:   cluster/gpu-wheels.sh            (packs what that machine lacks into .gpu/site.tar.xz)
# There, from the repository's root, carrying .gpu:
#                 bash cluster/gpu-bench.sh [extra `bench gpu` options, e.g. --option 'eager={...}']
#                 bash cluster/gpu-bench.sh tests   (instead: the `gpu`-marked tests, tiny models,
#                                                    about a minute plus compiles; $OUT/gpu-tests.xml)
# It unpacks .gpu/site.tar.xz, runs the package from the checkout (PYTHONPATH; nothing is
# installed into the machine's Python), writes the full-size random-weight checkpoint to local
# disk (9.8 GB; 57 s on 2 CPU cores) and runs `bench gpu` with settings sized to end in about
# 8 minutes on an H100. Results: $OUT/gpu.json (written after each part) and $OUT/gpu-bench.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-bench.log") 2>&1
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
PY=${PY:-python3}
SITE=${SITE:-/tmp/kandinsky-site}
if [ -f .gpu/site.tar.xz ] && [ ! -d "$SITE/ray" ]; then
  mkdir -p "$SITE" && xz -dc .gpu/site.tar.xz | tar -C "$SITE" -xf -
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'EOF'
import importlib, sys
missing = []
for name in ("torch", "ray", "ray.serve", "diffusers", "transformers", "fastapi", "pydantic", "multipart"):
    try:
        module = importlib.import_module(name)
        print(f"{name:14s}{getattr(module, '__version__', '')}")
    except Exception as error:  # noqa: BLE001 - report every missing piece at once
        missing.append(f"{name}: {error}")
import torch
if not torch.cuda.is_available():
    missing.append("torch.cuda.is_available() is False")
if missing:
    sys.exit("gpu-bench: cannot run:\n  " + "\n  ".join(missing) + "\n(run cluster/gpu-wheels.sh here and carry .gpu)")
EOF

if [ "${1:-}" = tests ]; then
  exec "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu --junitxml "$OUT/gpu-tests.xml"
fi

CHECKPOINT=${CHECKPOINT:-/tmp/kandinsky-2-2-full}
if [ ! -f "$CHECKPOINT/decoder/model_index.json" ]; then
  time "$PY" -m serve.cli make-tiny "$CHECKPOINT" --full-size --dtype float16
fi
time "$PY" -m serve.cli bench gpu --checkpoint "$CHECKPOINT" --device cuda --dtype float16 \
  --sizes "${SIZES:-512,768}" --steps 50 --prior-steps 25 --rounds "${ROUNDS:-3}" --batches "${BATCHES:-1,4,8,16}" \
  --load-duration "${LOAD_DURATION:-20}" --capacity-duration "${CAPACITY_DURATION:-10}" \
  --out "$OUT/gpu.json" "$@"
