"""What a committed transaction tells the other daemons sharing the store, and how it reads.

The notice is derived from the transaction's notes (`notes.Notes`), as this daemon's own
events are; how it travels is the backend's (PostgreSQL: NOTIFY on the schema's channel,
delivered with the commit), and what a notice heard means for this daemon's listeners is
`SqlStore._heard`.
"""

from __future__ import annotations

import logging

import msgspec

from taskd.store.core.notes import Notes

logger = logging.getLogger(__name__)


class Notice(msgspec.Struct, frozen=True, omit_defaults=True):
    """What one transaction tells the others: `sender` names the store that wrote it (its
    own notices are not news to it), `due` the seconds until the earliest job it made
    claimable, `finished` the (id, task) of jobs it ended, `cancelled` the ids it cancelled,
    `activity` the jobs it recorded progress or log lines of: (id, epoch, seq of the first
    line or -1, whether progress was recorded). Activity is a reference, never the lines
    themselves: a daemon with subscribers for the job reads them (NOTIFY carries less than
    8000 bytes, and a task may write lines of 4 KiB as fast as it likes)."""

    sender: str
    due: float | None = None
    finished: list[tuple[int, str]] = []
    cancelled: list[int] = []
    activity: list[tuple[int, int, int, bool]] = []


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Notice)


def encode_notices(notice: Notice, limit: int) -> list[str]:
    """The notice as payloads of at most `limit` bytes (split when it names many jobs)."""
    payload = _encoder.encode(notice)
    if len(payload) <= limit:
        return [payload.decode()]
    finished, cancelled, activity = notice.finished, notice.cancelled, notice.activity
    if len(finished) + len(cancelled) + len(activity) <= 1:  # a task name too long to send:
        return [_encoder.encode(Notice(notice.sender, due=0.0)).decode()]  # say "read again"
    half_f, half_c, half_a = len(finished) // 2, len(cancelled) // 2, len(activity) // 2
    first = Notice(
        notice.sender, notice.due, finished[:half_f], cancelled[:half_c], activity[:half_a]
    )
    second = Notice(notice.sender, None, finished[half_f:], cancelled[half_c:], activity[half_a:])
    return encode_notices(first, limit) + encode_notices(second, limit)


def decode_notice(payload: str) -> Notice | None:
    try:
        return _decoder.decode(payload)
    except msgspec.DecodeError:
        logger.warning("ignored a notice that is not taskd's: %.200r", payload)
        return None


def notice_of(notes: Notes, sender: str) -> Notice | None:
    """What the others must hear of a transaction, if anything (new jobs told them already,
    with their own statement)."""
    if notes.due is None and not (
        notes.finished or notes.retrying or notes.cancelled or notes.activity
    ):
        return None
    # Jobs waiting for a retry are named too: callers elsewhere follow attempts.
    ended = [(job.id, job.task) for job in [*notes.finished, *notes.retrying]]
    return Notice(sender, notes.due, ended, notes.cancelled, notes.activity)
