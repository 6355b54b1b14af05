"""The asyncio SDK: three jobs at once, each followed live, then the client's recent jobs.

    JOBLEDGER_API_KEY=jl_... python docs/examples/sdk_async.py [GPU_TYPE]

Each job is a `sleep` of a second or two that reports progress as it goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from app.client import AsyncClient, JobledgerError


async def follow(client: AsyncClient, job_id: str) -> str:
    """Print the job's progress until it ends; its final status."""
    status = "pending"
    async with contextlib.aclosing(client.watch(job_id, last_event_id=0)) as updates:
        async for update in updates:
            status = update.job.status
            print(f"  {job_id} #{update.sequence} {status} {update.job.progress}%")
    return status


async def main(gpu_type: str) -> int:
    """Submit, follow and list; 0 only if every job completed."""
    async with AsyncClient.from_env() as client:
        submitted = await asyncio.gather(
            *(client.submit("sleep", str(seconds), gpu_type=gpu_type) for seconds in (1, 2, 2))
        )
        statuses = await asyncio.gather(*(follow(client, job.job_id) for job in submitted))
        print("final:", ", ".join(statuses))

        page = await client.list(limit=5)
        print(f"{page.total} job(s) in all; the newest:")
        for job in page.jobs:
            print(f"  {job.job_id}  {job.status:<9}  {job.model:<8}  cost {job.cost}")
        return 0 if set(statuses) == {"completed"} else 1


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "cpu")))
    except JobledgerError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
