#!/usr/bin/env bash
# The GPU figures issues #6 and #7 need, in one call on a lent GPU host (no network, torch but no Prefect there).
#
#   bash benchmarks/device_checks.sh prepare       # here, once: wheels into .whl/, the shared CIFAR-10 into .data/
#   bash benchmarks/device_checks.sh run           # there, e.g. device run, carry [".whl", ".data"], timeout 600
#   SMOKE=1 bash benchmarks/device_checks.sh run   # anywhere: the same steps on a few hundred images, 1 epoch
#
# `run` writes its reports under $OUT (or ./device-out): summary.txt (also printed last) and reports.tar.gz (each
# section's .md, .json and .log of its stderr: parity, best, muon, muon-best, long-lean, long-lean-hard,
# airbench; see run() for what each measures). Earlier GPU runs (2026-11-26, H200, two sessions) measured the
# feed, airbench94/96, the recipes, sweeps and the compression table; RESULTS.md has them.
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
    # airbench is published as a source archive only; a wheel of it installs there without a build step.
    python3 -m pip wheel -q --no-deps -w .whl "airbench==0.1.8"  # its dependencies are torch and torchvision: the host's
    rm -f .whl/airbench-*.tar.gz
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

setup() {  # setup MODULES: the wheelhouse on PYTHONPATH, then a check that MODULES import
    mkdir -p "$OUT"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # kiln, tasks and flows from this checkout, uninstalled
    if [ -d .whl ] && ! "$PYTHON" -c 'import prefect, pydantic' 2>/dev/null; then
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

sweep() {  # sweep GRID...: SEEDS (default 1) cifar10-fast runs per combination (benchmarks/train_speed.py --sweep)
    setup pydantic,yaml,kiln.training
    local grids=()
    for grid in "$@"; do grids+=(--sweep "$grid"); done
    timeout -k 10 "${BUDGET_S:-400}" "$PYTHON" benchmarks/train_speed.py --data "$DATA" --skip-feed --skip-recipe \
        --epochs 10 --sweep-seeds "${SEEDS:-1}" "${grids[@]}" --json-out "$OUT/sweep.json" 2>"$OUT/sweep.log" \
        | tee "$OUT/sweep.md"
}

run() {
    # Sections in order of need, each stopped at its share of the time (BUDGET_S, default 560 s, fits a 600 s
    # call); every report is written as it goes, so a section cut short keeps what it measured.
    local budget=${BUDGET_S:-560} started=$SECONDS
    setup pydantic,yaml,airbench,kiln.training
    # The current plan (written for the third GPU session, revised in the sixth; earlier plans and what they found:
    # benchmarks/RESULTS.md). fit now lets cuDNN time its convolution algorithms (airbench does; kiln's earlier
    # figures ran without it).
    # parity: what airbench94 still does differently, on cifar10-fast at 10 epochs: its weight decay (2.7x kiln's,
    #   on the norm shifts too), the whitening bias at the base lr for 3 epochs, the alternating flip, and fp16
    #   (airbench trains in fp16; kiln's autocast default is bf16), as the balanced half of the 2^5 grid (16 runs,
    #   seed 0; each setting's two values compared over 8 runs each, two-setting interactions unconfounded).
    # best: each setting's better value (--best-of), seeds 1-3, at 10 epochs and at as many as fit the time target.
    # muon: cifar10-fast with those and train.optimizer=muon (kiln/muon.py) in the shape of airbench's Muon record
    #   (airbench94_muon.py, read line by line in the seventh session): batch 2000, 8 epochs, lr decaying linearly
    #   from its peak to 0; its head and shift lr (1.656 in kiln's terms: 0.67 per summed example on a head scaled
    #   1/256, against kiln's 1/9; shifts 0.053 x 2000 = 64 x 1.656), alternating flip, decayed shifts, and the
    #   whitening bias at the shifts' lr falling to 0 over 3 epochs (whiten_bias_schedule=shift_lr_to_zero), pinned
    #   whatever parity chose; over the filters' lr, the SGD part's decay (in kiln's coupled terms at lr 1.656,
    #   2.42e-3 is the record's 4e-3 a step, 1.21e-3 half that) and lookahead (the record has none): 8 runs, in
    #   bf16 (under fp16 the GradScaler would wait for the GPU every step: only fused SGD takes its inf check on the
    #   device). Compiled runs also compile the Newton-Schulz iteration, as the record does. muon-best: the better
    #   values, seeds 1-3, at 8 epochs and at as many as fit the time target.
    # long-lean: the later airbench96 (its repository's legacy/airbench96.py: 96.0 % on CIFAR-10 in 25 % less time
    #   than airbench 0.1.8's train96, which kiln's cifar10-long followed, 0.4 pt behind it at equal time):
    #   fastnet_lean (128/384/512, GELU after the residual add, BatchNorm momentum 0.1), 4-pixel translation,
    #   Cutout 12 wholly inside the image, alternating flip, peak lr 1.174 in kiln's terms (9.0 per 1024 summed
    #   examples), decay 0.012 per 1024 examples (1.333e-3 coupled at that lr) on the shifts too, the whitening bias
    #   at the base lr for 3 epochs, warm-up from 0.2 of the peak over 10 % of the steps, decay to 0; on
    #   cifar10-long's remaining settings (smoothing 0.2, shifts at 64x, lookahead), its precision from parity; as
    #   many epochs as fit the time target, seeds 1-3. long-lean-hard: the same with train.keep_hardest=0.5
    #   (kiln/hard_examples.py), which makes it airbench96_faster.py (96.0 % in 21 % less time again, though part
    #   of that is its torch.compile, which both kiln sections have), at the same time: it fits more epochs. airbench: train94 and train96 (0.1.8's) alongside, on the same device. Every run
    #   also scores four TTA combinations.
    # Time targets: 2.5 s and 23 s on the issue's H100 (with a margin: 2.4 s and 22.5 s). On an H200, scaled by what
    #   airbench took on each (train94 about 2.4 s on the issue's H100 against 1.92 s on an H200 here, 0.80; train96
    #   23.3 s against 19.65 s, 0.84), so its figures answer the H100's question. --fit-seconds picks the epochs from
    #   a probe run's last epoch on this device.
    # The sections that measure against the targets (3 seeds each) compile the model; the untimed warm-up and probe
    #   runs pay for compiling (airbench 0.1.8's trainers are not compiled; its repository's compiled variant is
    #   timed the same way). Sweeps run uncompiled (compile=auto: too few steps to repay it), which ranks settings the
    #   same at less time. On the CPU, a compiled fit with keep_hardest traced 3 graphs (proxy, main, proxy without
    #   grad) and reused them in later fits.
    local fast_s=2.4 long_s=22.5
    if grep -q H200 "$OUT/device.txt" 2>/dev/null; then fast_s=1.92 long_s=18.9; fi
    local compiled=(--set train.compile=on)
    local parity=(--epochs 10 --sweep-fraction half --sweep "train.weight_decay=5e-4,1.33e-3;train.decay_biases=false,true;train.whiten_bias_epochs=null,3;augment.flip=random,alternate;train.precision=bf16,fp16")
    local best=("${compiled[@]}" --best-of "$OUT/parity.json" --epochs 10 --fit-seconds "$fast_s" --runs 3
                --first-seed 1)
    local muon_shape=(--set train.optimizer=muon --set train.batch_size=2000 --set train.warmup_fraction=0.01
                      --set train.initial_lr_fraction=1 --set train.final_lr_fraction=0 --set train.lr=1.656
                      --set augment.flip=alternate --set train.decay_biases=true --set train.whiten_bias_epochs=3
                      --set train.whiten_bias_schedule=shift_lr_to_zero)
    local muon_grid="train.muon_lr=0.24,0.36;train.weight_decay=1.21e-3,2.42e-3;train.lookahead_steps=null,5;"
    muon_grid+="train.precision=bf16"
    local muon=("${muon_shape[@]}" --best-of "$OUT/parity.json" --epochs 8 --sweep "$muon_grid")
    local muon_best=("${compiled[@]}" "${muon_shape[@]}" --best-of "$OUT/parity.json" --best-of "$OUT/muon.json"
                     --epochs 8 --fit-seconds "$fast_s" --runs 3 --first-seed 1)
    local airbench96=(--set train.model=fastnet_lean --set augment.crop_padding=4 --set augment.cutout_inside=true
                      --set augment.flip=alternate --set train.lr=1.174 --set train.weight_decay=1.333e-3
                      --set train.decay_biases=true --set train.whiten_bias_epochs=3
                      --set train.initial_lr_fraction=0.2 --set train.warmup_fraction=0.1
                      --set train.final_lr_fraction=0)
    local long_lean=("${compiled[@]}" --profile cifar10-long --best-of "$OUT/parity.json" "${airbench96[@]}"
                     --fit-seconds "$long_s" --runs 3 --first-seed 1)
    local long_lean_hard=("${long_lean[@]}" --set train.keep_hardest=0.5)
    local airbench=(--skip-recipe --runs 2 --airbench-trainers train94,train96)
    if [ -n "${SMOKE:-}" ]; then
        local tiny=(--max-train 256 --max-test 128 --warmup-epochs 0)
        fast_s=4 long_s=8
        parity=("${tiny[@]}" --epochs 1 --sweep-fraction half
                --sweep "train.decay_biases=false,true;train.whiten_bias_epochs=null,0;train.precision=fp32,fp16")
        best=("${tiny[@]}" "${compiled[@]}" --best-of "$OUT/parity.json" --epochs 1 --fit-seconds "$fast_s" --runs 1)
        muon=("${tiny[@]}" "${muon_shape[@]}" --set train.batch_size=64 --best-of "$OUT/parity.json" --epochs 1
              --sweep "train.muon_lr=0.24,0.36;train.lookahead_steps=null,1")
        muon_best=("${tiny[@]}" "${compiled[@]}" "${muon_shape[@]}" --set train.batch_size=64
                   --best-of "$OUT/parity.json" --best-of "$OUT/muon.json" --epochs 1 --runs 1)
        long_lean=("${tiny[@]}" "${compiled[@]}" --profile cifar10-long --best-of "$OUT/parity.json"
                   "${airbench96[@]}" --fit-seconds "$long_s" --runs 1)
        long_lean_hard=("${long_lean[@]}" --set train.keep_hardest=0.5)
        airbench=(--skip-recipe --runs 1 --max-train 512 --max-test 256 --airbench-trainers train94)
    fi
    section() {  # section NAME SHARE_OF_WHAT_IS_LEFT(%) COMMAND...: runs COMMAND under that time limit, tee'd to $OUT
        local name=$1 share=$2; shift 2
        local left=$(( budget - (SECONDS - started) )) limit
        limit=$(( left * share / 100 ))
        echo "== $name: up to ${limit} s (${left} s left)" >&2
        if [ "$limit" -lt 20 ]; then echo "== $name: skipped, too little time left" | tee "$OUT/$name.md"; return 0; fi
        timeout -k 10 "$limit" "$@" 2>"$OUT/$name.log" | tee "$OUT/$name.md" || echo "== $name: stopped (exit ${PIPESTATUS[0]})" | tee -a "$OUT/$name.md"
    }
    rm -f /tmp/kiln-cifar-*.npz
    local speed=("$PYTHON" benchmarks/train_speed.py --data "$DATA" --skip-feed)
    # Estimated on the H200 (the first section also decodes the JPEGs, ~20 s; a compiled section's warm-up and probe
    # ~25 s): parity ~105 s, best ~35, muon ~45, muon-best ~45, long-lean ~95, long-lean-hard ~95, airbench ~60.
    # An H100 takes about 1.25x as long (airbench94: 2.4 s there, 1.92 s on the H200): with the shares below the
    # measuring sections' 3 seeds fit there too (simulated with 0-20 s of setup: long-lean 130-140 s for ~119,
    # long-lean-hard 131-151 s for ~119), and airbench, measured in both earlier GPU sessions and in the issue on an
    # H100, goes short first. A section cut short leaves --best-of undecided on what it did not complete.
    local cached=(--data-cache /tmp/kiln-cifar-recipes.npz)  # decoded once, by the first section
    section parity 30 "${speed[@]}" "${cached[@]}" --skip-recipe "${parity[@]}" --json-out "$OUT/parity.json"
    section best 15 "${speed[@]}" "${cached[@]}" "${best[@]}" --json-out "$OUT/best.json"
    section muon 18 "${speed[@]}" "${cached[@]}" --skip-recipe "${muon[@]}" --json-out "$OUT/muon.json"
    section muon-best 20 "${speed[@]}" "${cached[@]}" "${muon_best[@]}" --json-out "$OUT/muon-best.json"
    section long-lean 52 "${speed[@]}" "${cached[@]}" "${long_lean[@]}" --json-out "$OUT/long-lean.json"
    section long-lean-hard 100 "${speed[@]}" "${cached[@]}" "${long_lean_hard[@]}" \
        --json-out "$OUT/long-lean-hard.json"
    section airbench 100 "${speed[@]}" --airbench "${airbench[@]}" --json-out "$OUT/airbench.json"
    # The device tool returns the end of the output and a few files: the summary last, everything else in one archive.
    "$PYTHON" benchmarks/device_summary.py "$OUT" >"$OUT/summary.txt" 2>&1 || true
    tar czf /tmp/device-reports.tar.gz -C "$OUT" --exclude=summary.txt .
    find "$OUT" -mindepth 1 ! -name summary.txt -delete
    mv /tmp/device-reports.tar.gz "$OUT/reports.tar.gz"
    cat "$OUT/summary.txt"
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    sweep) shift; sweep "$@" ;;
    *) echo "usage: $0 prepare|run|sweep GRID..." >&2; exit 2 ;;
esac
