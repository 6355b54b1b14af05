"""The blocking SDK: submit a job, follow it to its end, download its result verified.

    JOBLEDGER_API_KEY=jl_... python docs/examples/sdk_sync.py [GPU_TYPE]

GPU_TYPE defaults to "cpu", the pseudo type of `scripts/serve --with-miner` on a
machine without NVIDIA GPUs. Exits with the CLI's codes (docs/clients.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

from app.client import Client, JobledgerError


def main(gpu_type: str) -> int:
    """Run one `sha256` job end to end; 0 only if it completed and its result verified."""
    with Client.from_env() as client:  # JOBLEDGER_URL, JOBLEDGER_API_KEY or a profile
        job = client.submit("sha256", "Hello, GPU", gpu_type=gpu_type, output_format="text")
        print(f"submitted {job.job_id}, estimated cost {job.estimated_cost}")

        # Every event after the submission, live, over the watch stream.
        for update in client.watch(job.job_id, last_event_id=1):
            print(f"  #{update.sequence} {update.type}: {update.job.status}")

        final = client.get(job.job_id)
        if final.status != "completed":
            print(f"{job.job_id} ended {final.status}: {final.error}")
            return 1
        saved = client.download(job.job_id, Path(f"{job.job_id}.txt"))
        print(f"saved {saved.path}: {saved.size_bytes} B, sha256 {saved.sha256} verified")
        print(f"cost {final.cost}")
        return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
    except JobledgerError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
