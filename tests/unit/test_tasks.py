"""Stopping tasks for sure, even ones that swallow a cancellation (Python 3.11's wait_for)."""

import asyncio

from app.tasks import cancel_all


async def test_a_task_that_survives_one_cancel_is_cancelled_again() -> None:
    stubborn_rounds = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                stubborn_rounds.append(1)
                if len(stubborn_rounds) == 1:
                    continue  # as asyncio.wait_for on 3.11 may do when a reply just arrived
                raise

    async def obedient() -> None:
        await asyncio.sleep(10)

    tasks = [asyncio.create_task(stubborn()), asyncio.create_task(obedient())]
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_all(tasks, patience=0.05), timeout=5)
    assert all(task.done() for task in tasks)
    assert len(stubborn_rounds) == 2


async def test_finished_and_failed_tasks_are_fine() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    async def ends() -> None:
        return None

    tasks = [asyncio.create_task(fails()), asyncio.create_task(ends())]
    await asyncio.sleep(0.01)
    await cancel_all(tasks)  # collects the failure instead of raising it
    assert isinstance(tasks[0].exception(), RuntimeError)
