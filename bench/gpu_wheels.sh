#!/usr/bin/env bash
# Run here (a machine with PyPI), before a GPU call: fills the git-ignored .whl/ with what the GPU
# host lacks, as Python 3.12 wheels (its image has torch, accelerate, typer, rich, psutil, pynvml and
# pytest, but no deepspeed, torchao, wandb or pycocoevalcap, and no network). Then run the device
# call with carry [".whl"] and the command `bash bench/gpu_session.sh [stage ...]`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl/py/pycocoevalcap
W=.whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$W" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" hjson annotated-types \
  typing-inspection 'typing-extensions>=4.16' torchao==0.18.0 einops msgpack ninja py-cpuinfo
# DeepSpeed ships only as an sdist: built here as a pure-Python wheel (its CPU Adam JIT-builds there).
if ! ls "$W"/deepspeed-*.whl >/dev/null 2>&1; then
  python3 -m venv /tmp/r2gen-dsbuild && /tmp/r2gen-dsbuild/bin/pip install -q wheel setuptools
  /tmp/r2gen-dsbuild/bin/pip wheel -q --no-deps deepspeed==0.19.8 -w "$W"
fi
# pycocoevalcap's BLEU, CIDEr, ROUGE-L and METEOR code without its 100 MB of jars: the host has no
# Java, so METEOR is reported n/a there either way.
site=$(python3 -c "import pycocoevalcap, os; print(list(pycocoevalcap.__path__)[0])")
for scorer in bleu cider rouge meteor; do
  mkdir -p "$W/py/pycocoevalcap/$scorer" && cp "$site/$scorer"/*.py "$W/py/pycocoevalcap/$scorer/"
done
du -sh "$W"
