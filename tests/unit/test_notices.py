"""The notice a transaction sends the other daemons: split to fit, read back whole."""

from __future__ import annotations

from taskd.store.core.notices import Notice, decode_notice, encode_notices


def test_a_notice_naming_many_jobs_is_split_into_payloads_that_fit() -> None:
    activity = [(n, 1, n * 10, n % 2 == 0) for n in range(4000, 4600)]
    notice = Notice(
        "me", 1.5, [(n, f"task-{n}") for n in range(2000)], list(range(3000, 3500)), activity
    )
    payloads = encode_notices(notice, 7900)
    assert len(payloads) > 1 and all(len(p.encode()) <= 7900 for p in payloads)
    heard = [decode_notice(payload) for payload in payloads]
    assert all(part is not None and part.sender == "me" for part in heard)
    assert [job for part in heard if part for job in part.finished] == notice.finished
    assert [job for part in heard if part for job in part.cancelled] == notice.cancelled
    assert [job for part in heard if part for job in part.activity] == notice.activity
    assert [part.due for part in heard if part and part.due is not None] == [1.5]


def test_a_job_too_long_to_name_becomes_read_again() -> None:
    (payload,) = encode_notices(Notice("me", None, [(1, "t" * 9000)]), 7900)
    assert decode_notice(payload) == Notice("me", due=0.0)


def test_a_notice_that_is_not_taskds_is_ignored() -> None:
    assert decode_notice("hello") is None
