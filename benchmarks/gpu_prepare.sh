#!/usr/bin/env bash
# Prepare the GPU run (benchmarks/gpu.py) on a machine that can reach PyPI and Debian, for a GPU machine
# that can fetch nothing and has Python 3.12 with CUDA torch, transformers, numpy, scipy, pillow, typer,
# rich, psutil, matplotlib, scikit-learn and nvidia-ml-py (see docs/scale.md):
#   .whl/  cp312 manylinux wheels of what m3d needs and that machine lacks (the versions installed here)
#   .gl/   the EGL/GL loader libraries (Debian packages, unpacked there), for moderngl on NVIDIA's EGL
# Both are git-ignored (the repo's .git/info/exclude) and travel as `carry` paths. Everything carried
# must stay under the 64 MiB a call may take, the working tree included: the script checks the sum.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
exclude=$(git rev-parse --git-path info/exclude)
for d in /.whl/ /.gl/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >>"$exclude"; done

# m3d's needs that the GPU machine's image does not hold (open3d is the raycast extra: not needed;
# qdrant-client only for a Qdrant server, ray only for --engine ray). faiss-gpu-cu12 (48 MB) would
# need CUDA 12's cuBLAS wheel (hundreds of MB) beside that machine's CUDA 13: it cannot travel.
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "${2:-}"; }
wheels=(
  "qdrant-edge-py==$(version qdrant-edge-py 0.9.0)"
  "faiss-cpu==$(version faiss-cpu 1.15.1)"
  "moderngl==$(version moderngl 5.13.0)"
  "glcontext==$(version glcontext 3.1.0)"
  "trimesh==$(version trimesh 5.2.0)"
)
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${wheels[@]}"

# GL: libglvnd's loaders; the NVIDIA driver's EGL vendor library is on that machine already
rm -rf .gl /tmp/amd64 && mkdir -p .gl /tmp/amd64/partial
apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
apt-get "${apt_opts[@]}" update -qq
(cd .gl && apt-get "${apt_opts[@]}" download -qq libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)

ls -l .whl .gl
tree_bytes=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
carried=$(du -cb .whl .gl | tail -1 | cut -f1)
total=$((tree_bytes + carried))
echo "working tree $((tree_bytes >> 20)) MiB + carried $((carried >> 20)) MiB = $((total >> 20)) MiB (limit 64 MiB)"
[ "$total" -lt $((64 << 20)) ] || { echo "too large to travel in one call" >&2; exit 1; }
