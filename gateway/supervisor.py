"""`roomcast gateway`: one worker in this process, or a supervisor of `workers` processes on one port.

Each worker is a full member (gateway/worker.py): its own room registry,
Redis subscriber and consumer in realtime-gateway-group, all on one port
with SO_REUSEPORT.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from gateway.worker import run_worker_process
from roomcast.config import GatewayConfig, env_name, to_environ

__all__ = ["serve"]

log = logging.getLogger("roomcast.gateway.supervisor")


def serve(config: GatewayConfig, worker_index: int | None = None) -> None:
    """Run the gateway: one worker in this process, or a supervisor of `workers` processes.

    The supervisor restarts a worker that dies and forwards SIGTERM/SIGINT to
    all of them (each drains on its own).
    """
    if worker_index is not None or config.workers == 1:
        run_worker_process(config, worker_index or 0)
        return
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    # The config goes to the workers in their environment, never as flags:
    # `ps` shows every process's command line to every local user.
    env = dict(os.environ, **to_environ(config))
    env[env_name(GatewayConfig, "workers")] = "1"

    def spawn(i: int) -> None:
        procs[i] = subprocess.Popen([sys.executable, "-m", "roomcast.cli", "gateway", "--worker-index", str(i)], env=env)

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for i in range(config.workers):
        spawn(i)
    while True:
        time.sleep(0.2)
        if stopping:
            if all(p.poll() is not None for p in procs.values()):
                return
            continue
        for i, p in list(procs.items()):
            if p.poll() is not None:
                log.warning("gateway worker %d exited with %s; restarting it", i, p.returncode)
                time.sleep(0.5)
                spawn(i)
