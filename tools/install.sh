#!/usr/bin/env bash
# Install arforge into a virtual environment (default ./.venv) from this checkout.
#
#   tools/install.sh          # the framework, the built-in plugins and the `arforge` command
#   tools/install.sh --test   # the same plus the test dependencies
#
# torch: a usable torch + torchvision already in the environment is kept (no
# multi-GB CUDA download on a machine that has one). Otherwise the pair known to
# work with lpips is installed: torch==2.14.1 torchvision==0.29.1
# (override with ARFORGE_TORCH_SPEC="torch==X torchvision==Y").
# ARFORGE_VENV=path picks another environment; ARFORGE_VENV=system uses the
# current python without a venv.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="[test]" ;;
    --npu) echo "torch-npu pins torch exactly: install the torch it names, then: pip install -e '.[npu]'"; exit 1 ;;
    *) echo "usage: tools/install.sh [--test]" >&2; exit 2 ;;
  esac
done

venv="${ARFORGE_VENV:-.venv}"
if [ "$venv" = "system" ]; then
  py="${PYTHON:-python3}"
else
  if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  py="$venv/bin/python"
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$py" -c "import torch, torchvision" >/dev/null 2>&1; then
  # shellcheck disable=SC2086
  "$py" -m pip install -q ${ARFORGE_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
fi
# arforge (packages/) and its built-in plugins (plugins/, their own distribution that
# registers through the same entry points a third-party plugin uses). A checkout from
# before the split may hold a stale ./arforge.egg-info that would shadow the new metadata.
rm -rf arforge.egg-info
"$py" -m pip install -q -e ".${extras}" -e ./plugins
"$py" -c "import arforge, torch; print(f'arforge {arforge.__version__} installed (torch {torch.__version__}) in', __import__('sys').prefix)"
