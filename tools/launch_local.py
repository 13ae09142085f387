"""Start N JAX processes of one command on this machine, joined through jax.distributed on 127.0.0.1.

    python -m tools.launch_local --num_processes=2 --cpu_devices_per_process=2 -- \\
        python -m phi_jax.train --config=configs/quickstart.py --workdir=runs/mp

The same code path as a TPU pod or a GPU cluster, on one host: each process gets PHI_JAX_COORDINATOR,
PHI_JAX_NUM_PROCESSES and PHI_JAX_PROCESS_ID (read by phi_jax.distributed.maybe_initialize). Output lines are
prefixed with the process id. If any process fails, the others are terminated and the launcher exits with the
first failing exit code; SIGTERM/SIGINT to the launcher are forwarded to every process.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(rank: int, stream) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(f"[{rank}] ".encode() + line)
        sys.stdout.flush()


def launch(command: list[str], num_processes: int, cpu_devices_per_process: int = 0, port: int = 0,
           env: dict | None = None) -> int:
    """Runs `command` as `num_processes` processes; returns 0 or the first non-zero exit code."""
    if not command:
        raise ValueError("No command given: put it after `--`.")
    port = port or free_port()
    procs = []
    for rank in range(num_processes):
        penv = {**os.environ, **(env or {}), "PHI_JAX_COORDINATOR": f"127.0.0.1:{port}",
                "PHI_JAX_NUM_PROCESSES": str(num_processes), "PHI_JAX_PROCESS_ID": str(rank)}
        if cpu_devices_per_process:
            penv.update(PHI_JAX_NUM_CPU_DEVICES=str(cpu_devices_per_process), JAX_PLATFORMS="cpu")
        p = subprocess.Popen(command, env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=_pump, args=(rank, p.stdout), daemon=True).start()
        procs.append(p)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                for p in procs:
                    if p.poll() is None:
                        p.terminate()
                for p in procs:
                    try:
                        p.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        p.kill()
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--cpu_devices_per_process", type=int, default=0,
                        help="fake CPU devices per process (0: use the real accelerators)")
    parser.add_argument("--port", type=int, default=0, help="coordinator port on 127.0.0.1 (0: a free one)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    sys.exit(launch(command, args.num_processes, args.cpu_devices_per_process, args.port))


if __name__ == "__main__":
    main()
