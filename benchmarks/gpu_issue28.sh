#!/usr/bin/env bash
# #28 item 4 on a lent GPU machine: the official sampler and rqgen's on the same 1.4B weights
# (benchmarks/gpu_official.py -> results/gpu_official.md), about 7 minutes on one H100/H200.
#
# 1. Here, from the repository root, with a clone of kakaobrain/rq-vae-transformer at GITDIR:
#        bash benchmarks/gpu_issue28.sh --prepare GITDIR
#    writes .official/ (its work tree, dataclass defaults patched for Python >= 3.11) and .whl/
#    (pure-Python wheels the GPU image lacks: omegaconf and its antlr4 runtime, braceexpand,
#    easydict), both ignored by git.
# 2. There, with .official and .whl carried along, from the repository root:
#        bash benchmarks/gpu_issue28.sh
#    results land in benchmarks/results/gpu_official.{md,json} and, where $OUT is set, in $OUT.
set -euo pipefail

if [[ ${1:-} == --prepare ]]; then
    src=${2:?usage: gpu_issue28.sh --prepare GITDIR}
    rm -rf .official .whl && mkdir -p .official .whl
    git -C "$src" archive HEAD | tar -x -C .official
    sed -i \
        -e 's/^from dataclasses import dataclass$/from dataclasses import dataclass, field/' \
        -e 's/\(block\): AttentionBlockConfig = AttentionBlockConfig()/\1: AttentionBlockConfig = field(default_factory=AttentionBlockConfig)/' \
        -e 's/\(body\|head\): AttentionStackConfig = AttentionStackConfig()/\1: AttentionStackConfig = field(default_factory=AttentionStackConfig)/' \
        .official/rqvae/models/rqtransformer/configs.py
    rm -rf .official/assets .official/data
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d .whl \
        omegaconf==2.3.0 braceexpand==0.1.7 easydict==1.13
    python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
    mkdir -p .git/info
    for p in /.official/ /.whl/; do grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >>.git/info/exclude; done
    du -sh .official .whl
    exit 0
fi

[[ -d .official/rqvae && -d .whl ]] || { echo "gpu_issue28: run --prepare first and carry .official and .whl" >&2; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
trap 'if [[ -n ${OUT:-} ]]; then cp benchmarks/results/gpu_official.* "$OUT"/ 2>/dev/null || true; fi' EXIT
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 benchmarks/gpu_official.py --official .official --budget-s 330
