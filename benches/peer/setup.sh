#!/usr/bin/env bash
# Makes the PyTorch CPU peer's virtualenv and prints the python to use on stdout. Everything
# else goes to stderr, because benches/peer.sh reads the path with $(...).
#
#   PY=$(benches/peer/setup.sh)
#
# The venv goes in target/tools/peer-venv under the repository root (git-ignored, and removed
# by `cargo clean` like any other build output); PEER_VENV puts it elsewhere and PYTHON picks
# the interpreter it is made from. A second run finds the install done and only checks it.
#
# The versions are pinned so that a comparison measures the same PyTorch from one run to the
# next. torch is the plain PyPI wheel: on Linux x86-64 that is the CUDA build, which pulls its
# nvidia-* wheels (about 5 GB in all, a few minutes the first time) although the peer only
# runs on the CPU; the CPU-only builds are published on PyTorch's own index, not on PyPI.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${PEER_VENV:-$root/target/tools/peer-venv}
python=${PYTHON:-python3}
requirements=(torch==2.15.0 numpy==2.4.6)

# The stamp is written only after pip succeeds, so an interrupted install is redone, and it
# holds the pins, so changing them here reinstalls into the same venv.
stamp=$venv/.peer-requirements
want=$(printf '%s\n' "${requirements[@]}")
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "peer: installing ${requirements[*]} into $venv" >&2
  mkdir -p "$(dirname "$venv")"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${requirements[@]}" >&2
  printf '%s\n' "$want" >"$stamp"
fi

# A broken install (a wheel removed by hand, a missing shared library) fails here, not in the
# middle of a benchmark.
"$venv/bin/python" -c 'import torch; torch.set_num_threads(2); (torch.randn(64,64)@torch.randn(64,64)).sum()' >/dev/null

# peer.py preloads jemalloc when it is installed (see its docstring): the peer is measured
# with it, so that the comparison is against the peer at its best. Without it the peer still
# runs, on glibc malloc. The install is said out loud, and a failed one is only a warning.
if [ ! -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "peer: installing libjemalloc2 (apt-get) for the peer's allocator" >&2
    apt-get install -y -q libjemalloc2 >/dev/null 2>&1 ||
      echo "peer: libjemalloc2 did not install; the peer runs on glibc malloc" >&2
  else
    echo "peer: libjemalloc2 is not installed; the peer runs on glibc malloc" >&2
  fi
fi
echo "$venv/bin/python"
