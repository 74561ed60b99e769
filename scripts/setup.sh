#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install vlmrl into it, idempotently:
# a re-run with nothing changed returns in about a second.
#
#   VLMRL_VENV   where the environment lives            (default: .venv)
#   VLMRL_TORCH  what to install when no torch is there  (default: torch==2.13.0, the CPU build here)
#   PYTHON       the interpreter that creates the venv   (default: python3, must be >= 3.10)
#
# A torch that is already importable in the venv is kept: to use a CUDA build, create the venv and
# install it first (python3 -m venv .venv && .venv/bin/pip install torch --index-url <cuda index>),
# or set VLMRL_TORCH to the spec you want. torchvision is never installed: it is not needed, and a
# mismatched build breaks transformers' image processors.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VLMRL_VENV:-.venv}
python=${PYTHON:-python3}
torch_spec=${VLMRL_TORCH:-torch==2.13.0}

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
    echo "vlmrl needs Python >= 3.10; $python is $("$python" --version 2>&1). Set PYTHON=python3.11 (or newer)." >&2
    exit 1
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"

stamp="$venv/.vlmrl-installed"
wanted=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ]; then
    exit 0
fi

pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    echo "setup: installing $torch_spec" >&2
    "${pip[@]}" "$torch_spec"
fi
echo "setup: installing vlmrl and its dependencies into $venv" >&2
"${pip[@]}" -e ".[dev]"

# MuJoCo renders offscreen through EGL (Mesa's software renderer on a machine without a GPU).
if ! ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1'; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing EGL/Mesa libraries for offscreen MuJoCo rendering" >&2
        apt-get update -qq && apt-get install -y -qq libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1 >/dev/null
    else
        echo "setup: libEGL is missing; MuJoCo envs (Reach, Push) cannot render. Install it, e.g." >&2
        echo "       sudo apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1" >&2
        exit 1
    fi
fi
if ! MUJOCO_GL=${MUJOCO_GL:-egl} "$venv/bin/python" -c 'import mujoco; r = mujoco.Renderer(mujoco.MjModel.from_xml_string("<mujoco/>"), 8, 8); r.close()' 2>/dev/null; then
    echo "setup: MuJoCo cannot render offscreen with MUJOCO_GL=${MUJOCO_GL:-egl}. On Debian/Ubuntu:" >&2
    echo "       sudo apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1 (or libosmesa6 and MUJOCO_GL=osmesa)" >&2
    exit 1
fi
# The labelling page's browser test drives the system's Chromium (never playwright's own download). Best
# effort: without it that one test skips, everything else works.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Chromium for the labelling page's browser test" >&2
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; } ||
            echo "setup: Chromium did not install; tests/test_labelling.py's browser test will skip" >&2
    else
        echo "setup: no /usr/bin/chromium; the labelling page's browser test will skip (sudo apt-get install chromium)" >&2
    fi
fi
echo "$wanted" > "$stamp"
