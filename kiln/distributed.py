"""Data-parallel training (PyTorch DDP) launched with torchrun from the train stage when train.devices > 1.

    launch_training(data_dir, policy_spec, config, checkpoint_path, out_dir)   # in the train stage's process

starts `python -m torch.distributed.run --nproc_per_node=N -m kiln.distributed JOB.json` and waits. Every worker
process (a rank) reads the same job, joins the process group (NCCL on GPUs, one GPU per rank; gloo on CPUs) and runs
`kiln.training.run_training` with its rank: each takes its share of every global batch (kiln/device_data.py shards
the device-resident data; the DataLoader path uses a DistributedSampler), DDP averages the gradients, loss and
accuracy are summed across ranks, and only rank 0 writes the checkpoint (resumable as in one process), the weights
and the history into `out_dir`. Per-epoch progress reaches the parent as JSON lines on rank 0's stdout.

BatchNorm statistics are per rank (SyncBatchNorm needs CUDA), so a run on N processes matches the one-process run
with the same global batch closely but not bit for bit; the test in tests/kiln/test_distributed.py measures how
closely, on CPU with gloo.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from kiln.config import TrainConfig
from kiln.errors import ConfigError, KilnError
from kiln.hard_examples import ONE_PROCESS_ONLY
from kiln.training import Distributed, EpochCallback, TrainingResult, resolve_runtime, run_training

LOGGER = logging.getLogger("kiln")
EPOCH_LINE = "kiln-epoch "  # prefix of rank 0's per-epoch JSON lines on stdout


def world_size(config: TrainConfig) -> int:
    """How many data-parallel processes train.devices asks for (auto: every visible GPU, at least 1)."""
    if config.devices == "auto":
        return max(torch.cuda.device_count(), 1)
    return int(config.devices)


def launch_training(
    data_dir: Path,
    policy_spec: dict[str, Any],
    config: TrainConfig,
    checkpoint_path: Path,
    out_dir: Path,
    on_epoch: EpochCallback | None = None,
) -> list[dict[str, Any]]:
    """Run the data-parallel job to completion; rank 0 writes the train stage's files into `out_dir`. Returns the
    stage's metrics. Raises KilnError with the workers' last output when any rank fails."""
    processes = world_size(config)
    gpus = torch.cuda.device_count()
    if config.device != "cpu" and gpus and processes > gpus:
        raise ConfigError(f"train.devices={processes} but only {gpus} GPU(s) are visible; set train.devices=auto")
    if processes > 1 and config.keep_hardest is not None:
        raise ConfigError(ONE_PROCESS_ONLY)
    # train.cuda_graph needs no refusal here: fit steps eagerly under data parallelism, with a log line (a profile
    # that captures its steps still runs on however many GPUs devices=auto finds).
    if processes > 1 and config.compile_mode == "reduce-overhead":
        raise ConfigError(
            "train.compile_mode=reduce-overhead (CUDA graphs) trains in one process only: kiln has not been checked "
            "with data-parallel gradients under CUDA graphs. Add --set train.devices=1, or --set "
            "train.compile_mode=default"
        )
    if config.batch_size % processes:
        raise ConfigError(
            f"train.batch_size={config.batch_size} is the global batch and must divide evenly among {processes} "
            f"data-parallel processes; use a multiple of {processes}"
        )
    with tempfile.TemporaryDirectory(prefix="kiln-ddp-") as scratch:
        job = Path(scratch, "job.json")
        job.write_text(json.dumps({
            "data_dir": str(data_dir), "policy": policy_spec, "config": config.model_dump(mode="json"),
            "checkpoint": str(checkpoint_path), "out_dir": str(out_dir), "metrics": str(Path(scratch, "metrics.json")),
        }))  # fmt: skip
        command = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "kiln.distributed", str(job),
        ]  # fmt: skip
        LOGGER.info(f"train: data-parallel on {processes} processes ({'NCCL' if gpus else 'gloo'}): {' '.join(command)}")
        environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=environment) as workers:  # fmt: skip
            tail: list[str] = []
            for line in workers.stdout:  # type: ignore[union-attr]
                if line.startswith(EPOCH_LINE):
                    if on_epoch is not None:
                        on_epoch(json.loads(line[len(EPOCH_LINE):]))
                    continue
                tail = (tail + [line.rstrip()])[-150:]
        if workers.returncode != 0:
            raise KilnError(
                f"data-parallel training failed (torchrun exit {workers.returncode}); last output:\n" + "\n".join(tail)
            )
        return json.loads(Path(scratch, "metrics.json").read_text())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_rank(job_path: Path) -> None:
    """One worker process: join the group, train as this rank, and (rank 0) write the outputs."""
    import torch.distributed as dist

    from kiln.training import write_training_output

    job = json.loads(job_path.read_text())
    config = TrainConfig.model_validate(job["config"])
    rank, size, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    runtime = resolve_runtime(config.device, config.precision)
    if runtime.device.type == "cuda":
        torch.cuda.set_device(local_rank)
        runtime = type(runtime)(torch.device("cuda", local_rank), runtime.precision, runtime.notes)
    dist.init_process_group("nccl" if runtime.device.type == "cuda" else "gloo")
    try:
        distributed = Distributed(rank, size)

        def announce(row: dict[str, Any]) -> None:
            print(EPOCH_LINE + json.dumps(row), flush=True)

        result: TrainingResult = run_training(
            Path(job["data_dir"]), job["policy"], config, Path(job["checkpoint"]), announce, distributed, runtime
        )
        if distributed.is_writer:
            metrics = write_training_output(result, config, Path(job["out_dir"]), size)
            Path(job["metrics"]).write_text(json.dumps(metrics))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _exit_without_teardown() -> None:
    """Leave a worker whose work is done and whose process group is destroyed without the interpreter's teardown:
    there, at times, torch's gloo backend aborts the process ("terminate called without an active exception",
    SIGABRT, seen with torch 2.14.1 on two CPU processes under load, after every rank had passed the last barrier
    and destroyed its group), and torchrun would report a finished run as failed."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))  # an exception propagates as usual: a traceback and a failed exit
    _exit_without_teardown()
