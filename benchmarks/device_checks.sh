#!/usr/bin/env bash
# The GPU figures issues #6 and #7 need, in one call on a lent GPU host (no network, torch but no Prefect there).
#
#   bash benchmarks/device_checks.sh prepare       # here, once: wheels into .whl/, the shared CIFAR-10 into .data/
#   bash benchmarks/device_checks.sh run           # there, e.g. device run, carry [".whl", ".data"], timeout 600
#   SMOKE=1 bash benchmarks/device_checks.sh run   # anywhere: the same steps on a few hundred images, 1 epoch
#
# `run` writes its reports under $OUT (or ./device-out): train_speed.md/.json (feed ratio, cifar10-fast
# time-to-accuracy over 3 seeds, airbench94/96 on the same images) and compression.md (ResNet-9 trained on the GPU,
# every compression variant retrained there, onnxruntime timed on 2 CPU threads like the issue's 2-core VM).
# Copy the figures into benchmarks/RESULTS.md with the device, date and command.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=.data/cifar10-jpg.tar.gz
OUT=${OUT:-device-out}
PYTHON=${PYTHON:-python3}

prepare() {
    # The host runs Python 3.12 and already holds torch, numpy, pandas, onnx, onnxruntime, pillow, pyyaml, fsspec,
    # httpx and more (/work/.library/device/KINDS.md); carry Prefect's stack, pydantic and airbench, minus those.
    mkdir -p .whl .data
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "prefect==3.9.1" "fastapi<0.151" pydantic
    python3 -m pip download -q --no-deps -d .whl "airbench==0.1.8"  # its dependency is torch: the host's
    local present='^(numpy|pandas|pillow|pyyaml|fsspec|httpx|httpcore|h11|anyio|idna|certifi|click|jinja2|markupsafe|'
    present+='packaging|pygments|rich|markdown_it_py|mdurl|typer|typing_extensions|python_dateutil|six|attrs|'
    present+='cloudpickle|sniffio|urllib3|requests|charset_normalizer|psutil|prometheus_client|pathspec|humanize|'
    present+='protobuf|torch|torchvision|triton|nvidia_.*|shellingham|uvloop|werkzeug|regex|filelock|sympy|mpmath|'
    present+='networkx|tqdm|zipp|yarl|multidict|frozenlist|aiosignal|aiohttp|propcache|aiohappyeyeballs)-'
    find .whl -name '*.whl' | while read -r wheel; do
        if basename "$wheel" | grep -qiE "$present"; then rm "$wheel"; fi
    done
    cp ../shared/datasets/cifar10-jpg.tar.gz "$DATA"
    du -sh .whl .data
}

run() {
    mkdir -p "$OUT"
    if [ -d .whl ] && ! "$PYTHON" -c 'import prefect, pydantic' 2>/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONUNBUFFERED=1 PREFECT_HOME=/tmp/prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false
    local speed=(--runs 3 --airbench) compression=()
    if [ -n "${SMOKE:-}" ]; then
        speed=(--runs 1 --max-train 512 --max-test 256 --feed-batch 64 --feed-steps 3 --epochs 1)
        compression=(--set train.epochs=1 --set compress.finetune_epochs=1 --set compress.distill_epochs=1
                     --set compress.latency_runs=3 --set compress.throughput_seconds=0.1 --set data.max_train_samples=512 --set data.max_test_samples=256)
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/device.txt" || true

    "$PYTHON" benchmarks/train_speed.py --data "$DATA" "${speed[@]}" --json-out "$OUT/train_speed.json" \
        | tee "$OUT/train_speed.md"

    "$PYTHON" benchmarks/compression.py --profile cifar10 --set data.source=imagefolder --set "data.uri=$DATA" \
        --set store.root=/tmp/kiln-bench-store --set compress.timing_threads=2 "${compression[@]}" \
        | tee "$OUT/compression.md"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
