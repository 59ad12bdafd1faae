#!/usr/bin/env bash
# The benchmark environment: influencekit plus the libraries it is compared with, at pinned
# versions. These are never the package's dependencies; `make bench` builds this once.
set -euo pipefail
venv=${1:-.bench-venv}
python=${PYTHON:-python3}
"$python" -m venv "$venv"
install() { "$venv/bin/python" -m pip install --quiet "$@"; }
install torch==2.13.0 "numpy<2"          # the CPU build on this disk; pyDVL 0.10 needs numpy<2
install -e .
install "pydvl[influence]==0.10.0" captum==0.9.0 dattri==0.3.0
# kronfluence 1.0.1 declares torchvision, whose PyPI build does not load beside this CPU torch;
# kronfluence never imports it, so it goes in without dependencies and then gets the rest.
install --no-deps kronfluence==1.0.1
install "accelerate>=0.31.0" "einops>=0.8.0" "einconv>=0.1.0" "opt-einsum>=3.3.0" \
        "safetensors>=0.4.2"
touch "$venv/.installed-stamp"
