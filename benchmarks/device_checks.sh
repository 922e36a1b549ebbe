#!/usr/bin/env bash
# The GPU figures issues #6 and #7 need, in one call on a lent GPU host (no network, torch but no Prefect there).
#
#   bash benchmarks/device_checks.sh prepare       # here, once: wheels into .whl/, the shared CIFAR-10 into .data/
#   bash benchmarks/device_checks.sh run           # there, e.g. device run, carry [".whl", ".data"]: ~400 s
#   SMOKE=1 bash benchmarks/device_checks.sh run   # anywhere: the same steps on a few hundred images, 1 epoch
#   bash benchmarks/device_checks.sh pipeline      # there: the whole flow, as a user runs it, every stage timed,
#                                                  # ~180 s; SMOKE=1 shrinks it too
#   bash benchmarks/device_checks.sh run; bash benchmarks/device_checks.sh pipeline   # both in one call, timeout 600
#
# `run` writes its reports under $OUT (or ./device-out): summary.txt (also printed last) and reports.tar.gz (each
# section's .md, .json and .log of its stderr: fast, long, airbench, fast-auto, long-auto, feed, graph-check; see
# run() for what each measures). Earlier GPU runs (2026-11-26 and 27, H200, four
# sessions) measured the feed, airbench94/96, the recipes, sweeps, captured steps and the compression table; the
# thirteenth session's, on an H100, the issue's targets (all three met); RESULTS.md has them.
# Copy the figures into benchmarks/RESULTS.md with the device, date and command.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=.data/cifar10-jpg.tar.gz
OUT=${OUT:-device-out}
PYTHON=${PYTHON:-python3}

prepare() {
    # The host runs Python 3.12 and already holds torch, numpy, pandas, onnx, onnxruntime, pillow, pyyaml, fsspec,
    # httpx and more (/work/.library/device/KINDS.md); carry Prefect's stack, Great Expectations (the pipeline
    # call's validate stage), pydantic and airbench, minus those. Not sniffio: anyio needs it and the H100's image
    # lacks it (the thirteenth session's first call stopped at its preflight for it).
    rm -rf .whl
    mkdir -p .whl .data
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    # HOST_PYTHON: the host's Python (3.12); another only to try the wheelhouse in a local stand-in for the host
    python3 -m pip download -q --only-binary=:all: --python-version "${HOST_PYTHON:-3.12}" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "prefect==3.9.1" "fastapi<0.151" pydantic "great-expectations>=1.24,<2" \
        "python-multipart>=0.0.9"  # the bundle pins it for its server
    # airbench is published as a source archive only; a wheel of it installs there without a build step.
    python3 -m pip wheel -q --no-deps -w .whl "airbench==0.1.8"  # its dependencies are torch and torchvision: the host's
    rm -f .whl/airbench-*.tar.gz
    local present='^(numpy|pandas|pillow|pyyaml|fsspec|httpx|httpcore|h11|anyio|idna|certifi|click|jinja2|markupsafe|'
    present+='packaging|pygments|rich|markdown_it_py|mdurl|typer|typing_extensions|python_dateutil|six|attrs|'
    present+='cloudpickle|urllib3|requests|charset_normalizer|psutil|prometheus_client|pathspec|humanize|'
    present+='protobuf|torch|torchvision|triton|nvidia_.*|shellingham|uvloop|werkzeug|regex|filelock|sympy|mpmath|'
    present+='networkx|tqdm|zipp|yarl|multidict|frozenlist|aiosignal|aiohttp|propcache|aiohappyeyeballs|scipy|'
    present+='narwhals|annotated_doc|colorama|markdown|pluggy|pyparsing)-'
    find .whl -name '*.whl' | while read -r wheel; do
        if basename "$wheel" | grep -qiE "$present"; then rm "$wheel"; fi
    done
    cp ../shared/datasets/cifar10-jpg.tar.gz "$DATA"
    du -sh .whl .data
    local travels  # the device tool carries 64 MiB in all: the tracked files and the carried folders
    travels=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) + $(du -scb .whl .data | tail -1 | cut -f1) ))
    echo "prepare: $((travels / 1024 / 1024)) MiB would travel"
    if [ "$travels" -gt $((63 * 1024 * 1024)) ]; then
        echo "prepare: that is too close to the device tool's 64 MiB: trim the wheelhouse" >&2
        exit 1
    fi
}

setup() {  # setup MODULES: the wheelhouse on PYTHONPATH, then a check that MODULES import
    mkdir -p "$OUT"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # kiln, tasks and flows from this checkout, uninstalled
    if [ -d .whl ] && ! "$PYTHON" -c "import $1" 2>/dev/null; then  # a host that lacks any of them gets the wheelhouse
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=$PYTHONPATH:/tmp/site
    fi
    export PYTHONUNBUFFERED=1 PREFECT_HOME=/tmp/prefect-home PREFECT_SERVER_ANALYTICS_ENABLED=false
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/device.txt" || true
    # Fail in seconds, not minutes, when the host lacks something.
    if ! "$PYTHON" -c "import torch, $1
print('preflight: torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'imports $1')" 2>&1 | tee "$OUT/preflight.txt"; then
        echo "preflight failed: see the import error above" >&2
        exit 1
    fi
}

sweep() {  # sweep GRID...: SEEDS (default 1) cifar10-fast runs per combination (train_speed.py --sweep)
    setup pydantic,yaml,kiln.training
    local grids=()
    for grid in "$@"; do grids+=(--sweep "$grid"); done
    timeout -k 10 "${BUDGET_S:-400}" "$PYTHON" benchmarks/train_speed.py --data "$DATA" --skip-feed --skip-recipe \
        --sweep-seeds "${SEEDS:-1}" "${grids[@]}" --json-out "$OUT/sweep.json" 2>"$OUT/sweep.log" \
        | tee "$OUT/sweep.md"
}

run() {
    # Sections in order of need, each stopped at its share of the time (BUDGET_S, default 400 s, which leaves a
    # 600 s call room for `pipeline` after it); every report is written as it goes, so a section cut short keeps
    # what it measured.
    local budget=${BUDGET_S:-400} started=$SECONDS
    setup pydantic,yaml,airbench,kiln.training,tasks.train  # tasks.train: Prefect, for runs through the train stage
    # The plan for the next session with a GPU. The thirteenth session (the fifth with a GPU, the first on the
    # issue's H100; benchmarks/RESULTS.md) met the issue's three targets there: the feed 0.958; cifar10-fast, now
    # 13 epochs, 91.22 % in 2.45 s (5 seeds); cifar10-long, now Muon on its filters at muon_lr 0.16, 93.71 % in
    # 20.9 s (3 seeds); both compiled and captured. What is left to measure, the profiles as they are:
    # fast: cifar10-fast, compiled (--set train.compile=on, as the figures are), 5 new seeds (16-20: with 11-15,
    #   ten), and a trace of one epoch (benchmarks/fit_trace.py), which the last plan's time shares cut off.
    # long: cifar10-long, compiled, 3 new seeds (4-6: with 1-3, six), and a trace.
    # airbench: train94 and train96 (0.1.8) on the same host and images, 2 runs each; on the H100, train96 has not
    #   run yet (the issue's table has it: 93.24 % in 23.3 s).
    # fast-auto, long-auto: the profiles as a single pipeline run trains them (compile=auto: uncompiled, captured),
    #   3 seeds and 1, after the same unreported warm-up run as the other sections (cuDNN's timing of its
    #   algorithms): the training time where compiling would not repay itself.
    # feed: the bare ResNet-9 step against the train stage's (issue (a)): 0.958 on the H100, 0.975 on an H200.
    # graph-check: tests/kiln/test_step_graph.py, whose CUDA-only tests capture for real and compare the loss curves
    #   of captured and eager steps for both profiles (skipped on a CPU); cifar10-long now captures Muon's step.
    # Every run also scores five TTA combinations; each report records the host's CPU and load average and what
    # torch.compile did (graphs, graph breaks, CUDA-graph skips), and each section's log has TORCH_LOGS' recompiles
    # and cudagraphs lines and kiln's train.cuda_graph lines (device_summary.py prints them). Read the traces' device
    # figures with care: CUPTI's records of kernels replayed from CUDA graphs are known to be wrong before CUDA 13.1
    # update 1 (pytorch/kineto issue 1165), and the hosts had CUDA 13.0.
    # Time targets: 2.5 s and 23 s on the issue's H100, which ran these captured steps about as fast as an H200 did
    # (an epoch about 5 % slower at most). Every recipe run is trained by the train stage's own function
    # (tasks/train.py), so each row's wall time is the whole stage's.
    local compiled=(--set train.compile=on)
    local fast=("${compiled[@]}" --runs 5 --first-seed 16 --trace)
    local long=("${compiled[@]}" --profile cifar10-long --runs 3 --first-seed 4 --trace)
    local airbench=(--airbench --skip-recipe --runs 2)
    local fast_auto=(--runs 3 --first-seed 11) long_auto=(--profile cifar10-long --runs 1 --first-seed 4)
    local feed=(--skip-recipe)
    if [ -n "${SMOKE:-}" ]; then
        local tiny=(--max-train 256 --max-test 128 --warmup-epochs 0 --set train.batch_size=64 --epochs 1)
        fast=("${tiny[@]}" "${compiled[@]}" --runs 1 --trace)
        long=("${tiny[@]}" "${compiled[@]}" --profile cifar10-long --runs 1 --trace)
        airbench=("${tiny[@]}" "${airbench[@]}")
        fast_auto=("${tiny[@]}" --runs 1) long_auto=("${tiny[@]}" --profile cifar10-long --runs 1)
        feed=("${tiny[@]}" --skip-recipe --feed-steps 5 --feed-batch 64)
    fi
    export TORCH_LOGS=${TORCH_LOGS:-recompiles,cudagraphs}  # into each section's .log (registered in torch 2.11)
    section() {  # section NAME SHARE_OF_WHAT_IS_LEFT(%) COMMAND...: runs COMMAND under that time limit, tee'd to $OUT
        local name=$1 share=$2; shift 2
        local left=$(( budget - (SECONDS - started) )) limit
        limit=$(( left * share / 100 ))
        echo "== $name: up to ${limit} s (${left} s left)" >&2
        if [ "$limit" -lt 20 ]; then echo "== $name: skipped, too little time left" | tee "$OUT/$name.md"; return 0; fi
        timeout -k 10 "$limit" "$@" 2>"$OUT/$name.log" | tee "$OUT/$name.md" || echo "== $name: stopped (exit ${PIPESTATUS[0]})" | tee -a "$OUT/$name.md"
    }
    rm -rf /tmp/kiln-cifar-*.npz /tmp/kiln-bench-store
    local speed=("$PYTHON" benchmarks/train_speed.py --data "$DATA" --skip-feed)
    # Estimated from the H100's times in the thirteenth session (the first section that trains also decodes the
    # JPEGs, ~20 s, and publishes them as the train stage's inputs, a few s; a compiled section's warm-up ~25 s):
    # fast ~80, long ~110, airbench ~75, fast-auto ~30, long-auto ~40, feed ~25, graph-check ~25: ~385 s of 400;
    # the last ones go short first.
    # Decoded once, by the first section that trains, and published once as the train stage's inputs (each run is
    # trained by the train stage's own function, which reads them from a store).
    local cached=(--data-cache /tmp/kiln-cifar-recipes.npz --stage-store /tmp/kiln-bench-store)
    section fast 22 "${speed[@]}" "${cached[@]}" "${fast[@]}" --json-out "$OUT/fast.json"
    section long 38 "${speed[@]}" "${cached[@]}" "${long[@]}" --json-out "$OUT/long.json"
    section airbench 45 "${speed[@]}" "${cached[@]}" "${airbench[@]}" --json-out "$OUT/airbench.json"
    section fast-auto 30 "${speed[@]}" "${cached[@]}" "${fast_auto[@]}" --json-out "$OUT/fast-auto.json"
    section long-auto 45 "${speed[@]}" "${cached[@]}" "${long_auto[@]}" --json-out "$OUT/long-auto.json"
    section feed 55 "$PYTHON" benchmarks/train_speed.py --data "$DATA" "${cached[@]}" "${feed[@]}" \
        --json-out "$OUT/feed.json"
    section graph-check 100 "$PYTHON" -m pytest -q -p no:cacheprovider tests/kiln/test_step_graph.py
    # The device tool returns the end of the output and a few files: the summary last, everything else in one archive.
    "$PYTHON" benchmarks/device_summary.py "$OUT" >"$OUT/summary.txt" 2>&1 || true
    tar czf /tmp/device-reports.tar.gz -C "$OUT" --exclude=summary.txt .
    find "$OUT" -mindepth 1 ! -name summary.txt -delete
    mv /tmp/device-reports.tar.gz "$OUT/reports.tar.gz"
    cat "$OUT/summary.txt"
}

pipeline() {
    # The whole flow on this host as a user runs it (`kiln run --profile cifar10-fast` on the shared JPEGs; Prefect's
    # temporary server, Great Expectations, export, compression and the bundle included): never run on a GPU before.
    # benchmarks/pipeline_stage_times.py prints each stage's seconds from its manifest and the whole wall time.
    setup pydantic,yaml,prefect,great_expectations,onnxscript,flows.training_pipeline
    local smaller=()
    if [ -n "${SMOKE:-}" ]; then
        smaller=(--set data.max_train_samples=256 --set data.max_test_samples=128 --set train.epochs=1
                 --set train.batch_size=64 --set evaluate.on_gate_failure=continue)  # 1 epoch fails the gate
    fi
    rm -rf /tmp/kiln-pipeline-store
    local status=0
    timeout -k 10 "${PIPELINE_BUDGET_S:-180}" "$PYTHON" benchmarks/pipeline_stage_times.py --profile cifar10-fast \
        --set data.source=imagefolder --set data.uri="$DATA" --set store.root=/tmp/kiln-pipeline-store \
        "${smaller[@]}" 2>"$OUT/pipeline.log" | tee "$OUT/pipeline.md" || status=$?
    if [ "$status" -ne 0 ]; then  # the device tool returns the output's end: the error belongs there
        echo "== pipeline: failed (exit $status); the end of its log:"
        tail -n 40 "$OUT/pipeline.log"
    fi
    return "$status"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    sweep) shift; sweep "$@" ;;
    pipeline) pipeline ;;
    *) echo "usage: $0 prepare|run|sweep GRID...|pipeline" >&2; exit 2 ;;
esac
