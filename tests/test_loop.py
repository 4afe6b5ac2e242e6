"""The event loop's parts: debounce and watchdog timing (pure), the mailbox's wake pipe."""

from __future__ import annotations

import select
import threading

from agent.daemon.loop import DEBOUNCE_MAX_S, DEBOUNCE_S, Debounce, Mailbox, Watchdog


def test_debounce_waits_for_quiet_but_not_forever() -> None:
    """A burst is due DEBOUNCE_S after its last event, at most DEBOUNCE_MAX_S after the first."""
    debounce = Debounce()
    assert debounce.deadline() is None and not debounce.take_if_due(100.0)
    debounce.note(10.0)
    debounce.note(10.1)
    assert debounce.deadline() == 10.1 + DEBOUNCE_S
    assert not debounce.take_if_due(10.1 + DEBOUNCE_S - 0.01)
    assert debounce.take_if_due(10.1 + DEBOUNCE_S)
    assert not debounce.take_if_due(20.0)  # taken once
    now = 30.0
    while now < 30.0 + 2 * DEBOUNCE_MAX_S:  # an endless trickle of events
        debounce.note(now)
        now += DEBOUNCE_S / 2
    assert debounce.deadline() == 30.0 + DEBOUNCE_MAX_S


def test_watchdog_is_due_at_once_then_every_interval() -> None:
    """The first ping is due at start, the next one interval after the last."""
    watchdog = Watchdog(5.0, now=100.0)
    assert watchdog.is_due(100.0)
    watchdog.sent(100.2)
    assert not watchdog.is_due(105.1) and watchdog.is_due(105.2)
    off = Watchdog(None, now=100.0)
    assert off.deadline() is None and not off.is_due(1e9)


def test_mailbox_wakes_the_loop_and_keeps_order() -> None:
    """Messages posted from another thread wake a select on the pipe and arrive in order."""
    mailbox: "Mailbox[int]" = Mailbox()
    try:
        def post_three() -> None:
            for number in range(3):
                mailbox.post(number)

        worker = threading.Thread(target=post_three)
        worker.start()
        worker.join()
        readable, _, _ = select.select([mailbox.read_fd], [], [], 5.0)
        assert readable == [mailbox.read_fd]
        mailbox.drain_pipe()
        assert select.select([mailbox.read_fd], [], [], 0)[0] == []
        assert list(mailbox.messages()) == [0, 1, 2]
        assert list(mailbox.messages()) == []
        for _ in range(100_000):  # a full pipe never blocks a poster
            mailbox.wake()
    finally:
        mailbox.close()
    mailbox.wake()  # after close: ignored, not a crash
