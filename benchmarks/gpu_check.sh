#!/usr/bin/env bash
# Every GPU-side check and benchmark in one run, for a GPU machine lent for a few minutes: the
# throughput tables of benchmarks/ and the GPU diagnostics of research/ (demo, gradcheck,
# variants):
#
#   bash benchmarks/gpu_check.sh [SECTION...]   # logs under $OUT (or ./gpu_out)
#
# SECTION: env model traits compile loader demo profile gradcheck variants autotune bf16rows
# sampled
# (default: the first seven, in this order).
#
# Sections run one after the other, each under its own time limit, most important first; each
# writes its log as it goes, so a section cut short still leaves what it measured. Wheels in
# .whl/ (webdataset, braceexpand, ete3, timm: what the GPU image may lack) are installed first.
# The GPU machine cannot download, so fetch them here first (ete3 ships only an sdist):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp -d .whl webdataset==1.0.2 braceexpand timm==1.0.31
#   python3 -m pip download --no-deps --no-binary=:all: -d /tmp/ete3 ete3==3.1.3
#   python3 -m pip wheel --no-deps --no-build-isolation /tmp/ete3/ete3-3.1.3.tar.gz -w .whl
set -u
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    # pip --target keeps only ete3/tools of the ete3 wheel: unpack it whole.
    for wheel in .whl/ete3-*.whl; do python3 -m zipfile -e "$wheel" /tmp/site; done
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"

section() {
    local name=$1 limit=$2 start
    shift 2
    start=$(date +%s)
    echo "=== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $(($(date +%s) - start)) s"
}

wanted=" ${*:-env model traits compile loader demo profile} "
run() {  # run NAME LIMIT COMMAND... when NAME was asked for
    [[ $wanted == *" $1 "* ]] && section "$@"
}

run env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
    nproc; python3 -c "import sys, torch, timm, webdataset, ete3;
print(sys.version.split()[0], torch.__version__, torch.version.cuda, timm.__version__,
      torch.cuda.get_device_name(), torch.backends.cuda.flash_sdp_enabled())"'
run model 170 python3 benchmarks/bench_model.py --full
run traits 60 python3 benchmarks/bench_traits.py --full --batch 256
run compile 120 python3 benchmarks/bench_model.py --full --compile --no-explicit \
    --modes train --only reference:200,scalable:10000
run loader 70 python3 benchmarks/bench_loader.py --image-size 256 --img-size 224 \
    --batch-size 128 --workers 14 --images-per-species 150 --steps 10 --threads 2 \
    --backbone vit_base_patch16_224
run demo 100 python3 research/gpu_demo.py --ranks species --workers 8
# Needs a trained demo checkpoint and its shards (snakemake --cores 8 results/species/eval.json)
# carried to the GPU machine.
run gradcheck 60 python3 research/gpu_grad_check.py results/species/model.pt results/shards \
    species
run variants 150 python3 research/gpu_demo.py --ranks species --workers 8 \
    --variants bf16,fp32,bf16-no-cudnn
run profile 60 python3 benchmarks/bench_model.py --full --no-explicit --modes train \
    --only scalable:10000 --profile
# GEMM autotuning and fused epilogues for the C = 10,000 class rows; compiling takes minutes.
run autotune 420 python3 benchmarks/bench_model.py --full --compile --no-explicit --modes train \
    --only scalable:10000 --compile-mode max-autotune-no-cudagraphs
# The class rows of the last block wholly in bf16 (PromptCAM.class_rows_in_autocast_dtype), eager
# and compiled, against autocast's fp32 LayerNorms and residual adds, in one process.
run bf16rows 300 python3 benchmarks/bench_model.py --full --compile --no-explicit --modes train \
    --only scalable:10000 --bf16-class-rows
# Training that scores 1,024 of the 10,000 classes per step (train.sampled_classes), eager and
# compiled, against all 10,000.
run sampled 300 python3 benchmarks/bench_model.py --full --compile --no-explicit --modes train \
    --only scalable:10000 --sampled-classes 1024
