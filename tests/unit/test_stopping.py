"""One stop arriving twice drains once; a later signal forces the exit (roomcast.stopping)."""

from roomcast.stopping import SAME_STOP_S, StopAction, StopSignals


def test_the_first_signal_drains_and_its_echo_is_ignored() -> None:
    signals = StopSignals()
    assert signals.received(100.0) is StopAction.DRAIN
    # Ctrl-C reaches a worker directly and again through its supervisor.
    assert signals.received(100.0 + SAME_STOP_S / 2) is StopAction.IGNORE


def test_a_signal_sent_later_forces_the_exit() -> None:
    signals = StopSignals()
    signals.received(100.0)
    assert signals.received(100.0 + SAME_STOP_S + 0.01) is StopAction.FORCE
