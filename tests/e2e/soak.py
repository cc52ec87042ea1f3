"""Soak: the mixed faults of the fault suite, for as long as you like (not in CI).

    python -m tests.e2e.soak --minutes 30 [--seed 7] [--spacing 0.5 3] [--data-dir DIR]

Runs the real stack (two gateway workers, the chat service, Redis, the
embedded broker) with clients posting, injects a fault every few seconds
(drawn from the same kinds and spacing as tests/e2e/test_faults.py; a wide
`--spacing`, say 20 20, measures each kind's heal time on its own), and
prints one summary line a minute: posts acked and stored, deliveries, faults
and heals, the longest heal and the longest past its bound, and the RSS of
every process (so growth without bound shows). At the end it checks what the
suite checks and exits 1 if anything was lost, doubled, out of order or not
healed in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from roomcast.config import KafkaTuning
from roomcast.watchdog import stall_bound_s
from roomcast.wire.events import CREATED_TOPIC, decode_event
from tests.e2e.chaos import (
    ChaosClient,
    ChaosRun,
    HealTargets,
    draw_schedule,
    produced_against_stored,
    read_topic,
    stored_messages,
)
from tests.e2e.stack import Stack, start_stack

ROOMS = ["soak-a", "soak-b", "soak-c", "soak-d"]
SESSION_S = 6.0


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def process_rss(stack: Stack) -> dict[str, float | None]:
    named = {"redis": stack.redis, "broker": stack.kafka, "chat": stack.chat}
    named.update({f"gateway{i}": g for i, g in enumerate(stack.gateways)})
    return {name: (round(mb, 1) if (mb := rss_mb(p.proc.pid)) is not None else None) for name, p in named.items()}


async def soak(minutes: float, seed: int, data_dir: Path, spacing_s: tuple[float, float]) -> int:
    # Every message kept (retention_count 0): the end checks every room from seq 1.
    stack = await asyncio.to_thread(start_stack, data_dir, 2, 4, ("--retention-count", "0"))
    rng = random.Random(seed)
    urls = [stack.ws_url(0), stack.ws_url(1)]
    clients = [ChaosClient(f"s{i}", urls[i % 2 :] + urls[: i % 2], rng.sample(ROOMS, 2), 0.1) for i in range(12)]
    chat_watchdog_s = stall_bound_s(int(SESSION_S * 1000), KafkaTuning().rebalance_timeout_ms)
    count = max(7, int(minutes * 60 / (sum(spacing_s) / 2)))
    faults = draw_schedule(seed, count, gateways=2, clients=len(clients), spacing_s=spacing_s)
    run = ChaosRun(stack, faults, HealTargets(SESSION_S, chat_watchdog_s), clients, log=lambda _: None)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop)) for c in clients]
    run.supervise()
    started = time.monotonic()
    print(f"soak: seed {seed}, {len(faults)} faults over about {faults[-1].at_s / 60:.1f} min; data in {data_dir}", flush=True)

    async def report_every_minute() -> None:
        while True:
            await asyncio.sleep(60)
            run.measure_heals()
            healed = [r.heal_s for r in run.records if r.heal_s is not None]
            summary = {
                "minute": round((time.monotonic() - started) / 60, 1),
                "posts acked": sum(len(c.acked) for c in clients),
                "stored": len(await asyncio.to_thread(stored_messages, run.db_path)),
                "deliveries": sum(len(v) for c in clients for v in c.received.values()),
                "faults": len(run.records),
                "healed": len(healed),
                "max heal s": round(max(healed, default=0.0), 2),
                "late": len(run.unhealed()) - (len(run.records) - len(healed)),
                "rss MB": process_rss(stack),
            }
            print("soak:", json.dumps(summary), flush=True)

    reporter = asyncio.create_task(report_every_minute())
    try:
        await asyncio.sleep(2)
        await run.play()
        await asyncio.sleep(chat_watchdog_s + 6)
        await run.settle(90)
    finally:
        stop.set()
        reporter.cancel()
        await asyncio.gather(*tasks, reporter, return_exceptions=True)
        await run.stop_supervising()
        final_rss = process_rss(stack)
        produced = [decode_event(value) for _, _, value in await read_topic(stack.kafka.address, CREATED_TOPIC)]
        await asyncio.to_thread(stack.stop)
        (data_dir / "stack.log").write_text("\n".join(stack.logs) + "\n")

    run.measure_heals()
    stored = stored_messages(run.db_path)
    print("soak:", json.dumps(run.report(stored)))
    print("soak: heal times", json.dumps(run.heal_table()))
    print("soak: final RSS MB", json.dumps(final_rss))
    problems = {check: found for check, found in run.problems(stored).items() if found}
    if disagree := produced_against_stored(produced, stored):
        problems["message.created disagrees with the store"] = disagree
    if problems:
        print(f"soak FAILED (seed {seed}):")
        for check, found in problems.items():
            print(f"  {check}: {len(found)}, e.g. {found[:3]}")
        return 1
    print(f"soak passed: seed {seed}, {len(stored)} messages, {len(run.records)} faults")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to inject faults (default 30)")
    parser.add_argument("--seed", type=int, default=None, help="the fault schedule's seed (default: random, printed)")
    parser.add_argument(
        "--spacing", type=float, nargs=2, default=(0.5, 3.0), metavar=("MIN", "MAX"),
        help="seconds between two faults, drawn between MIN and MAX (default 0.5 3: they overlap)",
    )
    parser.add_argument("--data-dir", type=Path, default=None, help="where the stack's files go (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error("--minutes must be above 0")
    if not 0 < args.spacing[0] <= args.spacing[1]:
        parser.error("--spacing takes MIN MAX with 0 < MIN <= MAX")
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="roomcast-soak-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    import uvloop

    return uvloop.run(soak(args.minutes, seed, data_dir, tuple(args.spacing)))


if __name__ == "__main__":
    sys.exit(main())
