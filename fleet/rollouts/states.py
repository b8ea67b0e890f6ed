"""A device's state in a rollout, and how an update event or its status moves it: pure.

``pending`` (its wave has not started) -> ``offline_waiting`` (its wave started while it was
offline; it gets the instruction when it returns, until the deadline, else ``expired``) ->
``sent`` -> ``downloading`` (downloading, verifying, staged) -> ``activated`` -> ``confirmed``
(its status document names the target: the first health probe passed). Or ``failed`` (a
rejection, no response, never confirmed; ``reason_code`` says which), ``rolled_back`` (the
probe failed after activation), ``skipped_incompatible`` (the device said the pack is not
for its hardware or agent). ``aborted``: pending or waiting when a person aborted.

A rollback moves ``rb_state`` of the devices that took the new pack through the same states.
"""

from __future__ import annotations

PENDING = "pending"
OFFLINE_WAITING = "offline_waiting"
SENT = "sent"
DOWNLOADING = "downloading"
ACTIVATED = "activated"
CONFIRMED = "confirmed"
FAILED = "failed"
ROLLED_BACK = "rolled_back"
SKIPPED = "skipped_incompatible"
EXPIRED = "expired"
ABORTED = "aborted"

STATES = (
    PENDING,
    OFFLINE_WAITING,
    SENT,
    DOWNLOADING,
    ACTIVATED,
    CONFIRMED,
    FAILED,
    ROLLED_BACK,
    SKIPPED,
    EXPIRED,
    ABORTED,
)
# no event can move these any more
FINAL = frozenset({CONFIRMED, FAILED, ROLLED_BACK, SKIPPED, EXPIRED, ABORTED})
# the instruction is out: the device decides what happens next
IN_FLIGHT = frozenset({SENT, DOWNLOADING, ACTIVATED})
# counted against a wave's failure rate
FAILURES = frozenset({FAILED, ROLLED_BACK})
# took the new pack: what a rollback sends back
TOOK_NEW = frozenset({ACTIVATED, CONFIRMED})

_EVENT_STATES = {
    "downloading": DOWNLOADING,
    "verifying": DOWNLOADING,
    "staged": DOWNLOADING,
    "activated": ACTIVATED,
    "rolled_back": ROLLED_BACK,
}
# a rejection for one of these is about the device, not the pack
NOT_FOR_THIS_DEVICE = frozenset({"incompatible"})


def after_event(state: str, event_state: str, reason_code: str | None) -> str:
    """The state once an update event of this rollout arrived. Events only move forward:
    a late ``downloading`` after ``activated`` changes nothing, a final state stays, and a
    device that was sent nothing yet is not moved by one."""
    if state in FINAL or state in (PENDING, OFFLINE_WAITING):
        return state  # nothing was sent to it: an event naming this rollout is not its answer
    if event_state == "rejected":
        return SKIPPED if reason_code in NOT_FOR_THIS_DEVICE else FAILED
    new = _EVENT_STATES.get(event_state)
    if new is None:
        return state
    order = (SENT, DOWNLOADING, ACTIVATED)
    if new == ROLLED_BACK or state not in order or order.index(new) >= order.index(state):
        return new
    return state
