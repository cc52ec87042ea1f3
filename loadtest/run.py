"""Start `roomcast dev` on free ports, run locust headless against it, stop the stack.

    python loadtest/run.py --smoke                 # CI: ~25 s in all, exit 1 on a breach or errors
    python loadtest/run.py --time 2m --chatty-users 100 --chatty-interval 0.1
    flock /tmp/roomcast-bench.lock python loadtest/run.py ...   # on a shared box

Reports go to --reports (default reports/): <name>_stats.csv,
<name>_stats_history.csv, <name>_failures.csv, <name>_exceptions.csv and
<name>.html. The exit status is locust's: 1 when a budget of
loadtest/locustfile.py was missed or a request failed; 1 also when the stack
did not start.

Options not listed here are passed to locust unchanged (e.g.
--p99-budget-ms 30, --broadcast-users 200, --processes 2).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from roomcast.devstack import DevProcess, DevProcessFailed, start_dev_process
from roomcast.embedded import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# --smoke: 75 sockets, ~45 posts/s, ~550 deliveries/s, for 12 s after spawning.
# Its budgets are loose on purpose (a CI tripwire for errors, loss and gross
# regressions): on the embedded Tansu broker, whose fetches are not woken by
# new data, two consumer hops of fetch_max_wait_ms=10 alone put p99 near 25 ms
# (see bench/README.md). Pass --p99-budget-ms 25 to check the real budget.
SMOKE_BUDGETS = ["--p99-budget-ms", "150", "--ack-p99-budget-ms", "100"]
SMOKE = {
    "time": "12s",
    "chatty_users": 20,
    "chatty_room_size": 10,
    "chatty_interval": 0.5,
    "broadcast_users": 30,
    "broadcast_senders": 1,
    "broadcast_interval": 0.2,
    "idle_users": 20,
    "churn_users": 5,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python loadtest/run.py",
        description="Run the locust load test against a fresh `roomcast dev` stack; exit 1 on a budget breach or errors.",
        epilog="Unknown options go to locust (see loadtest/locustfile.py for the scenario and budget options).",
    )
    p.add_argument("--smoke", action="store_true", help="the CI preset: ~75 users for 12 s (about 25 s in all)")
    p.add_argument("--time", default=None, help="locust run time, e.g. 60s, 5m (default 60s; smoke 12s)")
    p.add_argument("--workers", type=int, default=2, help="gateway worker processes of roomcast dev (default 2)")
    p.add_argument("--name", default=None, help="report file prefix (default loadtest or loadtest-smoke)")
    p.add_argument("--reports", default=str(REPO / "reports"), help="report directory (default reports/)")
    p.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all within 1 s)")
    p.add_argument("--host", default=None, help="test this running gateway (ws://.../ws) instead of starting roomcast dev")
    for key, value in SMOKE.items():
        if key != "time":
            p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None, help=f"scenario size (smoke: {value})")
    args, passthrough = p.parse_known_args(argv)

    sizes = {k: getattr(args, k) for k in SMOKE if k != "time"}
    if args.smoke:
        sizes = {k: (v if v is not None else SMOKE[k]) for k, v in sizes.items()}
    run_time = args.time or (SMOKE["time"] if args.smoke else "60s")
    name = args.name or ("loadtest-smoke" if args.smoke else "loadtest")
    reports = Path(args.reports)
    reports.mkdir(parents=True, exist_ok=True)

    counts = {
        "ChattyUser": sizes["chatty_users"] if sizes["chatty_users"] is not None else 20,
        "BroadcastUser": sizes["broadcast_users"] if sizes["broadcast_users"] is not None else 30,
        "IdleUser": sizes["idle_users"] if sizes["idle_users"] is not None else 20,
        "ChurnUser": sizes["churn_users"] if sizes["churn_users"] is not None else 5,
    }
    users = sum(counts.values())
    classes = [cls for cls, n in counts.items() if n > 0]
    scenario_flags: list[str] = []
    for key, value in sizes.items():
        if value is not None:
            scenario_flags += [f"--{key.replace('_', '-')}", str(value)]

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="roomcast-loadtest-") as tmp:
        dev: DevProcess | None = None
        host = args.host
        if host is None:
            # The test switches of the CI are no settings of the stack (roomcast refuses unknown ROOMCAST_*).
            env = {k: v for k, v in os.environ.items() if not k.startswith("ROOMCAST_REQUIRE_")}
            try:
                dev = start_dev_process(Path(tmp), "--port", str(free_port()), "--workers", str(args.workers), env=env)
            except DevProcessFailed as exc:
                print(f"loadtest: {exc}", file=sys.stderr)
                return 1
            host = dev.fields["ws"]
            print(f"loadtest: roomcast dev ready at {host} in {time.monotonic() - started:.1f} s", flush=True)
        cmd = [
            sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"),
            "--headless", "--host", host,
            "-u", str(users), "-r", str(args.spawn_rate or users), "-t", run_time,
            "--stop-timeout", "3",
            "--reset-stats",  # warm-up excluded: the figures start once every user is spawned
            "--csv", str(reports / name), "--csv-full-history", "--html", str(reports / f"{name}.html"),
            "--run-id", f"lt{int(time.time())}",
            *scenario_flags, *(SMOKE_BUDGETS if args.smoke else []), *passthrough, *classes,
        ]
        print("loadtest: " + " ".join(cmd[2:]), flush=True)
        try:
            code = subprocess.run(cmd, cwd=REPO).returncode
        finally:
            if dev is not None:
                dev.stop()
    print(f"loadtest: exit {code} after {time.monotonic() - started:.1f} s; reports in {reports}/{name}*", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
