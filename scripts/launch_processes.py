#!/usr/bin/env python
"""Runs the same experiment command on every worker of a multi-process JAX job.

JAX is multi-controller: each host (or GPU) runs one copy of the same script, and
``jaxlora.distributed.initialize()`` at the top of that script connects the copies into
one global device mesh. This launcher only starts the copies with the environment
``initialize()`` reads; the script itself is unchanged from a single-process run.

    # N processes on this machine (CPU testing; each gets K fake CPU devices)
    python scripts/launch_processes.py local -n 2 --cpu-devices 4 -- python train.py --steps 10

    # a plain list of hosts over ssh: process i runs on host i, host 0 coordinates
    python scripts/launch_processes.py ssh --hosts gpu0,gpu1 --workdir ~/jaxlora -- python train.py

    # inside a SLURM allocation: srun starts one task per GPU, JAX reads SLURM's variables
    python scripts/launch_processes.py slurm \\
        --srun-args "--nodes=2 --ntasks-per-node=8 --gpus-per-task=1" -- python train.py

    # every worker VM of a Cloud TPU pod slice; JAX reads the slice topology itself
    python scripts/launch_processes.py tpu --name my-v5e-32 --zone us-west4-a --workdir ~/jaxlora \\
        -- python train.py

``--dry-run`` prints the commands instead of running them. In ``local`` and ``ssh`` mode the
launcher waits for every process, prefixes their output with ``[i]``, and stops the rest
as soon as one fails, exiting with its status.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence


def free_port() -> int:
    """A TCP port that is free on this machine now (for the local coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(coordinator: str, num_processes: int, process_id: int) -> dict[str, str]:
    """The variables ``jaxlora.distributed.initialize()`` reads for an explicit setup."""
    return {
        "JAX_COORDINATOR_ADDRESS": coordinator,
        "JAX_NUM_PROCESSES": str(num_processes),
        "JAX_PROCESS_ID": str(process_id),
    }


def _exports(env: Mapping[str, str]) -> str:
    return " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


def local_commands(
    command: Sequence[str], num_processes: int, *, cpu_devices: int | None, port: int
) -> list[tuple[list[str], dict[str, str]]]:
    """``(argv, extra_env)`` for each local process."""
    out = []
    for i in range(num_processes):
        env = process_env(f"127.0.0.1:{port}", num_processes, i)
        if cpu_devices:
            flags = os.environ.get("XLA_FLAGS", "")
            env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}"
            env["XLA_FLAGS"] = env["XLA_FLAGS"].strip()
            env["JAX_PLATFORMS"] = "cpu"
        out.append((list(command), env))
    return out


def ssh_commands(
    command: Sequence[str], hosts: Sequence[str], *, port: int, workdir: str | None
) -> list[tuple[list[str], dict[str, str]]]:
    """``(argv, {})`` for each host: ``ssh host 'cd workdir && VARS=... command'``."""
    coordinator = f"{hosts[0]}:{port}"
    out = []
    for i, host in enumerate(hosts):
        remote = f"{_exports(process_env(coordinator, len(hosts), i))} {shlex.join(command)}"
        if workdir:
            remote = f"cd {workdir} && {remote}"
        out.append((["ssh", host, remote], {}))
    return out


def slurm_command(command: Sequence[str], srun_args: str) -> list[str]:
    """``srun ARGS command``: one task per process; JAX detects SLURM by itself."""
    return ["srun", *shlex.split(srun_args), *command]


def tpu_command(
    command: Sequence[str],
    *,
    name: str,
    zone: str,
    project: str | None,
    workdir: str | None,
) -> list[str]:
    """``gcloud ... tpu-vm ssh NAME --worker=all --command ...`` for a pod slice."""
    # On TPU VMs JAX finds the coordinator and process ids from the slice's metadata;
    # JAXLORA_DISTRIBUTED=auto tells initialize() to ask it even though no variable says so.
    remote = f"JAXLORA_DISTRIBUTED=auto {shlex.join(command)}"
    if workdir:
        remote = f"cd {workdir} && {remote}"
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, f"--zone={zone}"]
    if project:
        cmd.append(f"--project={project}")
    return [*cmd, "--worker=all", f"--command={remote}"]


def _pump(i: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[{i}] {line}")
        out.flush()


def run_all(jobs: Sequence[tuple[list[str], dict[str, str]]], timeout: float | None) -> int:
    """Starts every job, relays their output, and returns the first failure's status."""
    procs = []
    pumps = []
    for i, (argv, extra) in enumerate(jobs):
        p = subprocess.Popen(
            argv,
            env={**os.environ, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        t = threading.Thread(target=_pump, args=(i, p.stdout, sys.stdout), daemon=True)
        t.start()
        procs.append(p)
        pumps.append(t)
    deadline = None if timeout is None else time.monotonic() + timeout
    status = 0
    # poll every process each round (any() would stop polling at the first live one)
    while [p.poll() for p in procs].count(None):
        failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
        late = deadline is not None and time.monotonic() > deadline
        if failed or late:
            # one dead worker leaves the others blocked in a collective: stop them
            status = failed[0] if failed else 124
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            break
        time.sleep(0.1)
    for t in pumps:
        t.join(timeout=5)
    return status or next((p.returncode for p in procs if p.returncode), 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    sub = parser.add_subparsers(dest="mode", required=True)
    loc = sub.add_parser("local", help="N processes on this machine")
    loc.add_argument("-n", "--num-processes", type=int, required=True)
    loc.add_argument("--cpu-devices", type=int, help="fake CPU devices per process")
    loc.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    loc.add_argument("--timeout", type=float, help="stop every process after this many s")
    ssh = sub.add_parser("ssh", help="one process per host of a list, over ssh")
    ssh.add_argument("--hosts", required=True, help="comma-separated; the first coordinates")
    ssh.add_argument("--port", type=int, default=8476)
    ssh.add_argument("--workdir", help="directory to cd into on every host")
    ssh.add_argument("--timeout", type=float)
    slurm = sub.add_parser("slurm", help="srun inside a SLURM allocation")
    slurm.add_argument("--srun-args", default="", help='e.g. "--ntasks-per-node=8"')
    tpu = sub.add_parser("tpu", help="every worker of a Cloud TPU VM slice")
    tpu.add_argument("--name", required=True)
    tpu.add_argument("--zone", required=True)
    tpu.add_argument("--project")
    tpu.add_argument("--workdir")
    for p in (loc, ssh, slurm, tpu):
        p.add_argument("command", nargs=argparse.REMAINDER, help="-- the experiment command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")

    if args.mode in ("local", "ssh"):
        if args.mode == "local":
            port = args.port or free_port()
            jobs = local_commands(
                command, args.num_processes, cpu_devices=args.cpu_devices, port=port
            )
        else:
            hosts = [h for h in args.hosts.split(",") if h]
            jobs = ssh_commands(command, hosts, port=args.port, workdir=args.workdir)
        if args.dry_run:
            for argv_i, env in jobs:
                print(f"{_exports(env)} {shlex.join(argv_i)}".strip())
            return 0
        return run_all(jobs, args.timeout)

    if args.mode == "slurm":
        cmd = slurm_command(command, args.srun_args)
    else:
        cmd = tpu_command(
            command, name=args.name, zone=args.zone, project=args.project, workdir=args.workdir
        )
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
