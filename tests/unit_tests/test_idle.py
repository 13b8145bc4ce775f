"""An idle worker gives memory back (`service.worker.idle`), in-process."""

from __future__ import annotations

import asyncio

from service.worker.idle import IdleTrim, give_back_memory, rss_mib


async def _until(condition: object) -> None:
    async with asyncio.timeout(10):  # only a hung test reaches it
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.001)


async def test_memory_is_given_back_once_the_worker_stays_idle() -> None:
    in_flight = 1
    trim = IdleTrim(lambda: in_flight == 0, after_s=0, at_most_every_s=0)
    trim.idle()  # a run ended, another is still in flight: nothing to do
    assert trim.pending is False
    in_flight = 0
    trim.idle()
    assert trim.pending is True
    await _until(lambda: not trim.pending)
    assert trim.given_back == 1


async def test_a_worker_busy_again_keeps_its_memory_until_it_is_idle_again() -> None:
    in_flight = 0
    trim = IdleTrim(lambda: in_flight == 0, after_s=0, at_most_every_s=0)
    trim.idle()
    in_flight = 1  # a new event came before the give-back
    await _until(lambda: not trim.pending)
    assert trim.given_back == 0
    in_flight = 0
    trim.idle()
    await _until(lambda: not trim.pending)
    assert trim.given_back == 1


async def test_give_backs_are_spaced_and_close_forgets_a_pending_one() -> None:
    trim = IdleTrim(lambda: True, after_s=0, at_most_every_s=3600)
    trim.idle()
    await _until(lambda: not trim.pending)
    trim.idle()  # the next one is an hour away
    assert trim.pending is True
    trim.close()
    assert trim.pending is False and trim.given_back == 1


def test_give_back_memory_reads_the_rss_before_and_after() -> None:
    before, after = give_back_memory()
    assert before is not None and after is not None and after > 0
    assert rss_mib() is not None
