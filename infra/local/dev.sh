#!/usr/bin/env bash
# Local set-up and the two README commands.
#   bash infra/local/dev.sh demo   # venv + fixtures + the embedded default job, prints the table
#   bash infra/local/dev.sh test   # venv + fixtures + system test tools + the test suite
# Idempotent: the venv is reused while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=${STRATA_VENV:-.venv}
# The CPU build of torch; on a CUDA machine install your CUDA build of torch into the venv
# first and set STRATA_TORCH="" so this script leaves it alone.
STRATA_TORCH=${STRATA_TORCH-torch==2.13.0}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }

apt_install() {  # install Debian packages that are missing (root or sudo needed)
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq && as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || { echo "could not install ${missing[*]}: install them and re-run" >&2; return 1; }
}

setup_venv() {
  local extras=$1 stamp
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  stamp="$VENV/.strata-$(cat pyproject.toml | sha256sum | cut -c1-16)-$extras"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    [ -n "$STRATA_TORCH" ] && "$VENV/bin/pip" install -q "$STRATA_TORCH"
    "$VENV/bin/pip" install -q -e ".[$extras]"
    touch "$stamp"
  fi
}

peer_venv() {  # GPTQModel, a real reader of GPTQ/AWQ checkpoints, in a venv of its own
  local venv=.venv-gptqmodel
  [ -f "$venv/.strata-ready" ] && return 0
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install -q torch==2.13.0 gptqmodel==7.6.0 && touch "$venv/.strata-ready"
}

fixtures() {
  # Austen (calibration and held-out text), the KJV (off-domain held-out text), fortunes (calibration mix)
  apt_install r-cran-janeaustenr bible-kjv bible-kjv-text fortunes
  "$VENV/bin/strata" fixtures
}

case "${1:-}" in
  demo)
    setup_venv dev
    fixtures
    exec "$VENV/bin/strata" demo --overwrite "${@:2}"
    ;;
  test)
    setup_venv dev,readers,bnb
    apt_install chromium   # renders the HTML report in a test
    peer_venv
    fixtures
    set +e
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "${@:2}"
    rc=$?
    [ $rc -eq 5 ] && { echo "no tests collected" >&2; exit 1; }
    exit $rc
    ;;
  *)
    echo "usage: bash infra/local/dev.sh demo|test [args]" >&2
    exit 2
    ;;
esac
