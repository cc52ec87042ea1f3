"""The mixed-fault suite's own logic: its seeded schedules and its heal bounds (tests/e2e/chaos.py)."""

from __future__ import annotations


from roomcast.wire.events import MessageEvent
from tests.e2e.chaos import (
    FAULT_KINDS,
    ChaosClient,
    ChaosRun,
    Fault,
    HealRecord,
    HealTargets,
    draw_schedule,
    produced_against_stored,
)


def test_a_seed_draws_the_same_schedule_with_every_kind_and_no_double_freeze() -> None:
    for seed in range(50):
        faults = draw_schedule(seed, 14, gateways=2, clients=12)
        assert faults == draw_schedule(seed, 14, gateways=2, clients=12)
        assert {f.kind for f in faults} == set(FAULT_KINDS)
        gaps = [b.at_s - a.at_s for a, b in zip(faults, faults[1:])]
        # 0.5-3 s apart, unless a freeze waited for the same process to thaw first.
        assert all(g >= 0.1 for g in gaps) and max(gaps) <= 3.0 + 4.0 + 0.1
        for kind in ("chat_stop", "broker_stop"):
            spans = [(f.at_s, f.at_s + f.duration_s) for f in faults if f.kind == kind]
            assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:])), (seed, kind, spans)


def _run(records: list[HealRecord], client: ChaosClient) -> ChaosRun:
    run = ChaosRun(stack=None, faults=[], targets=HealTargets(6, 8), clients=[client], log=lambda _: None)  # type: ignore[arg-type]
    run.records = records
    run.measure_heals()
    return run


def test_a_heal_is_the_first_newer_seq_on_every_member_and_late_ones_are_reported() -> None:
    client = ChaosClient("c", [], ["r"], 0.1)
    client.arrivals["r"] = [(100.5, 10), (101.4, 11), (109.0, 12)]
    cut = HealRecord(Fault(0, "pubsub_cut", 0, 0), started=100.0, ended=100.0, latest_before={"r": 10})
    run = _run([cut], client)
    assert cut.heal_s is not None and abs(cut.heal_s - 1.4) < 1e-9
    assert cut.bound_s == 1.0
    assert run.unhealed() == ["pubsub_cut@0.0s: healed 1.40 s, bound 1.00 s"]


def test_an_overlapping_fault_stretches_the_bound_and_a_freeze_during_a_rejoin_restarts_it() -> None:
    client = ChaosClient("c", [], ["r"], 0.1)
    client.arrivals["r"] = [(120.0, 50)]
    kill = HealRecord(Fault(0, "chat_kill", 0.5, 0), started=100.0, ended=100.5, latest_before={"r": 40})
    freeze = HealRecord(Fault(3, "chat_stop", 2.0, 0), started=103.0, ended=105.0, latest_before={"r": 40})
    run = _run([kill, freeze], client)
    # The freeze hit the chat service while it rejoined: kill target (8 + 5) from the freeze's end.
    assert freeze.bound_s == 105.0 + 13.0 - 103.0
    assert kill.bound_s == 105.0 + 13.0 - 100.0
    assert run.unhealed() == ["chat_kill@0.0s/0.5s: healed 20.00 s, bound 18.00 s", "chat_stop@3.0s/2.0s: healed 17.00 s, bound 15.00 s"]


def _event(seq: int, cid: str, room: str = "r") -> MessageEvent:
    return MessageEvent(id=f"id-{seq}", room=room, seq=seq, user="u", body="b", client_msg_id=cid, ts=0)


def test_message_created_must_agree_with_the_store_re_emits_aside() -> None:
    stored = [("r", 1, "u", "a"), ("r", 2, "u", "b")]
    assert produced_against_stored([_event(1, "a"), _event(2, "b"), _event(1, "a")], stored) == []
    assert produced_against_stored([_event(1, "a"), _event(2, "b"), _event(3, "a")], stored) == [
        "('r', 'u', 'a') produced with seqs [1, 3]"
    ]
    assert produced_against_stored([_event(1, "a"), _event(2, "b"), _event(2, "c")], stored) == [
        "r seq 2 produced for [('u', 'b'), ('u', 'c')]",
        "r seq 2: stored for u/b, produced for [('u', 'b'), ('u', 'c')]",
    ]
    assert produced_against_stored([_event(1, "a")], stored) == ["r seq 2 (u/b) stored but never produced"]


def test_on_kafka_a_broker_kill_lands_during_the_rebalance_a_worker_kill_starts() -> None:
    from tests.e2e.chaos import BROKER_KILL, FAULT_KINDS

    for seed in range(50):
        faults = draw_schedule(seed, 16, gateways=2, clients=12, fault_kinds=FAULT_KINDS + (BROKER_KILL,))
        worker_kill = next(f for f in faults if f.kind == "worker_kill")
        assert any(f.kind == BROKER_KILL and f.at_s == round(worker_kill.at_s + 0.3, 2) for f in faults), seed
        assert [f.at_s for f in faults] == sorted(f.at_s for f in faults)
