#!/usr/bin/env bash
# One entry point for people and CI: creates/reuses .venv, then runs a task.
#   ./dev.sh main    the main job (see README)
#   ./dev.sh test    lint + the whole test suite
# torch 2.13.0 is installed first and pinned. pip takes whatever wheel its indexes offer: on the
# development machine a CPU wheel on local disk; elsewhere set TORCH_INDEX_URL to PyTorch's CPU
# wheel index, or PyPI's default (a CUDA build, several GB) is what arrives.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)

if [ ! -f "$STAMP" ]; then
  echo "[dev.sh] preparing $VENV (first run takes a few minutes)" >&2
  [ -x $VENV/bin/python ] || "$PY" -m venv $VENV
  $VENV/bin/python -m pip install -q --upgrade pip
  $VENV/bin/python -m pip install -q "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  $VENV/bin/python -m pip install -q -e ".[dev,hf]" "torch==2.13.0"
  rm -f $VENV/.installed-* && touch "$STAMP"
fi
export PATH="$PWD/$VENV/bin:$PATH"

case "${1:-}" in
  main)
    shift
    out=runs/paper-schedule
    mkdir -p $out
    bigmac plan --schedule bigmac --pp 4 --vpp 2 --microbatches 64 --encoder-warmup 3 --llm-warmup group \
      --png $out/gantt.png --memory-png $out/memory.png --json $out/plan.json
    python -m examples.mllm.train --config examples/configs/mllm_cpu.yaml "$@"
    ;;
  test)
    shift
    ruff check .
    ruff format --check lightning_bigmac balancer tests benchmarks examples
    pytest "$@"
    ;;
  *)
    echo "usage: ./dev.sh main|test [extra args]" >&2
    exit 2
    ;;
esac
