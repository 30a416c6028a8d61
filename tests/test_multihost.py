"""Multi-process training and the pod launcher (scripts/launch_processes.py).

Two CPU processes on localhost (a coordinator on 127.0.0.1 at a free port, 2 fake devices
each) train LoRA on one global 4-device mesh that spans both, and must save the same
adapters as one process on one device.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parent.parent
WORKER = ROOT / "tests" / "_sharding_worker.py"
LAUNCH = ROOT / "scripts" / "launch_processes.py"


def _launch_module():
    spec = importlib.util.spec_from_file_location("jaxlora_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(cmd, timeout, **env):
    # the children must not inherit a device count or platform from this process
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


def test_two_processes_match_one_process(tmp_path):
    start = time.monotonic()
    single, multi = tmp_path / "single.npz", tmp_path / "multi.npz"
    _run([sys.executable, str(WORKER), str(single)], timeout=110, JAX_PLATFORMS="cpu")
    out = _run(
        [
            sys.executable,
            str(LAUNCH),
            "local",
            "-n",
            "2",
            "--cpu-devices",
            "2",
            "--timeout",
            "100",
            "--",
            sys.executable,
            str(WORKER),
            str(multi),
            "--mesh",
            "fsdp=2,tensor=2",
        ],
        timeout=110,
    )
    assert "[0] process 0/2: 4 devices" in out and "[1] process 1/2: 4 devices" in out, out
    with np.load(single, allow_pickle=False) as a, np.load(multi, allow_pickle=False) as b:
        assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
        for key in a.files:
            np.testing.assert_allclose(b[key], a[key], atol=1e-5, rtol=0, err_msg=key)
        assert a["losses"][-1] < a["losses"][0]
    assert time.monotonic() - start < 120


def test_launcher_stops_the_others_when_one_fails():
    code = (
        "import os, sys, time\n"
        "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(LAUNCH), "local", "-n", "2", "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 3
    assert time.monotonic() - start < 30


def test_launcher_commands():
    launch = _launch_module()
    jobs = launch.local_commands(["python", "t.py"], 2, cpu_devices=4, port=1234)
    assert [env["JAX_PROCESS_ID"] for _, env in jobs] == ["0", "1"]
    assert jobs[1][1]["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234"
    assert jobs[0][1]["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=4")

    (_, env0), (ssh1, _) = launch.ssh_commands(
        ["python", "t.py", "--x", "a b"], ["h0", "h1"], port=99, workdir="~/r"
    )
    assert env0 == {}
    assert ssh1[:2] == ["ssh", "h1"]
    assert ssh1[2] == (
        "cd ~/r && JAX_COORDINATOR_ADDRESS=h0:99 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 "
        "python t.py --x 'a b'"
    )
    assert launch.slurm_command(["python", "t.py"], "--ntasks-per-node=8") == [
        "srun",
        "--ntasks-per-node=8",
        "python",
        "t.py",
    ]
    tpu = launch.tpu_command(
        ["python", "t.py"], name="pod", zone="us-west4-a", project=None, workdir="~/r"
    )
    assert tpu[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
    assert "--worker=all" in tpu
    assert tpu[-1] == "--command=cd ~/r && JAXLORA_DISTRIBUTED=auto python t.py"


def test_launcher_dry_run(capsys):
    launch = _launch_module()
    assert launch.main(["--dry-run", "local", "-n", "2", "--port", "7", "--", "echo", "hi"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "JAX_COORDINATOR_ADDRESS=127.0.0.1:7 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 echo hi",
        "JAX_COORDINATOR_ADDRESS=127.0.0.1:7 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 echo hi",
    ]
    with pytest.raises(SystemExit):
        launch.main(["local", "-n", "2"])


CKPT_WORKER = ROOT / "tests" / "_ckpt_multihost.py"


def _launch_ckpt(mode: str, directory: pathlib.Path) -> str:
    cmd = [sys.executable, str(LAUNCH), "local", "-n", "2", "--cpu-devices", "2"]
    cmd += ["--timeout", "150", "--", sys.executable, str(CKPT_WORKER), mode, str(directory)]
    # the workers import this checkout's jaxlora, whatever is installed
    return _run(cmd, timeout=170, PYTHONPATH=str(ROOT))


def _flip_bytes_of(item_dir: pathlib.Path, head: bytes) -> list[pathlib.Path]:
    """Flips a byte inside every stored copy of ``head`` (an array region's first bytes):
    orbax keeps each process's own file and copies its data into the merged database that
    restore reads."""
    flipped = []
    for path in sorted(p for p in item_dir.rglob("*") if p.is_file()):
        raw = bytearray(path.read_bytes())
        at = raw.find(head)
        if at >= 0:
            raw[at + 5] ^= 0x5A
            path.write_bytes(bytes(raw))
            flipped.append(path)
    assert flipped, f"no file under {item_dir} holds the bytes {head.hex()}"
    return flipped


def test_multihost_checkpoints_are_checksummed_per_shard(tmp_path):
    import json

    out = _launch_ckpt("save", tmp_path)
    for layout in ("fsdp onto fsdp", "fsdp onto reversed devices", "fsdp onto replicated"):
        assert f"[0] restored {layout}" in out and f"[1] restored {layout}" in out, out
    assert "[0] restored repl onto fsdp" in out and "[0] OK 0" in out and "[1] OK 1" in out
    # each process recorded the regions it holds of each factor, keyed by index, and the
    # records were gathered into the step's metadata (written by process 0)
    qa = "layers/0/attn/q_proj/kernel/a"
    meta = json.loads((tmp_path / "fsdp" / "1" / "meta" / "metadata").read_text())
    regions = [index for index, _ in meta["checksums"]["adapters"][qa]]
    assert regions == [[[lo, lo + 64], [0, 16]] for lo in (0, 64, 128, 192)], regions
    wrote = dict(re.findall(r"^\[\d\] WROTE (\w+) ([0-9a-f]+)$", out, flags=re.M))
    assert set(wrote) == {"fsdp", "repl"}, out
    assert "[1] WROTE fsdp" in out  # a region written by process 1
    for name, head in wrote.items():
        flipped = _flip_bytes_of(tmp_path / name / "1" / "adapters", bytes.fromhex(head))
        if name == "fsdp":
            assert any("ocdbt.process_1" in str(f) for f in flipped), flipped
    out = _launch_ckpt("corrupt", tmp_path)
    for p in ("0", "1"):
        refused = [line for line in out.splitlines() if line.startswith(f"[{p}] REFUSED")]
        assert len(refused) == 3, out
        for line in refused:
            assert "checksum mismatch" in line and qa in line, line
