"""Faults between processes: a real SIGKILL of `kiln run` in the middle of training, then the same command again
(it resumes from the last checkpoint, losing at most the epoch that was running, and finishes with a valid bundle);
and two identical runs at once on one store (one builds, the other reuses)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kiln.bundle import load_bundle
from tests.e2e.test_kiln_run import KILN, fresh_env
from tests.e2e.test_prefect_deployments import PrefectStack
from tests.serving.conftest import free_port

pytestmark = pytest.mark.slow

EPOCHS = 12
# Small batches make each digits epoch last about a second on 2 cores, so the kill lands inside an epoch.
COMMAND = [*KILN, "run", "--set", f"train.epochs={EPOCHS}", "--set", "train.batch_size=4"]
KILL_AFTER_EPOCH = 3


def test_sigkill_mid_training_then_rerun_resumes_and_finishes(tmp_path: Path):
    env = fresh_env(tmp_path)
    log_path = tmp_path / "first-run.log"
    with open(log_path, "w") as log:
        first = subprocess.Popen(COMMAND, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 600
        while f"epoch {KILL_AFTER_EPOCH}/{EPOCHS}" not in log_path.read_text():
            assert first.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "training never reached the kill point"
            time.sleep(0.1)
        time.sleep(0.3)  # into the next epoch
        os.killpg(first.pid, signal.SIGKILL)  # the run and its temporary Prefect server, no chance to clean up
        first.wait(timeout=30)
    completed = [int(n) for n in re.findall(rf"epoch (\d+)/{EPOCHS}", log_path.read_text())]
    assert first.returncode == -signal.SIGKILL and max(completed) < EPOCHS
    checkpoints = list((tmp_path / "artifacts" / ".scratch" / "train").glob("*/checkpoint.pt"))
    assert len(checkpoints) == 1 and not list((tmp_path / "artifacts").glob("train/*/manifest.json"))

    second = subprocess.run(COMMAND, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)

    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    output = second.stdout + second.stderr
    resumed = int(re.search(rf"resuming from the checkpoint after epoch (\d+) of {EPOCHS}", output).group(1))
    assert max(completed) - 1 <= resumed <= max(completed)  # at most the running epoch is lost
    rerun_epochs = [int(n) for n in re.findall(rf"epoch (\d+)/{EPOCHS}:", output)]
    assert rerun_epochs == list(range(resumed + 1, EPOCHS + 1))
    bundle = re.search(r"^Bundle:\s+(\S+)$", second.stdout, re.MULTILINE).group(1)
    assert load_bundle(bundle).labels == [str(digit) for digit in range(10)]
    assert not list((tmp_path / "artifacts" / ".scratch" / "train").glob("*/checkpoint.pt"))  # cleaned up


def test_two_identical_runs_at_once_on_one_store_train_once_and_agree(tmp_path: Path):
    """Two `kiln run`s started together against one Prefect server: one builds each stage, the other waits and
    reuses it; both finish with the same bundle and every stage output exists once."""
    stack = PrefectStack(tmp_path / "prefect-home", free_port())
    try:
        stack.start("server", "server", "start", "--host", "127.0.0.1", "--port", stack.url.rsplit(":", 1)[1])
        stack.wait_healthy()
        command = [*KILN, "run", "--set", f"store.root={tmp_path / 'store'}"]
        runs = [subprocess.Popen(command, cwd=tmp_path, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for _ in range(2)]  # fmt: skip
        outputs = [run.communicate(timeout=900)[0] for run in runs]
    finally:
        stack.stop()
    assert [run.returncode for run in runs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    bundles = {re.search(r"^Bundle:\s+(\S+)$", output, re.MULTILINE).group(1) for output in outputs}
    assert len(bundles) == 1
    train_status = [re.search(r"^train\s+(\w+)", output, re.MULTILINE).group(1) for output in outputs]
    assert sorted(train_status) == ["computed", "reused"]
    for stage in ("download", "train", "package"):
        assert len(list((tmp_path / "store" / stage).glob("*/manifest.json"))) == 1
