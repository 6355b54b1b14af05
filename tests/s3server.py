"""A real S3-compatible HTTP server on loopback for the tests: moto's, in a subprocess.

Register it for a whole test tree with `from tests.s3server import s3_server  # noqa: F401`
in that tree's conftest.py (or import it the same way in one test module).
"""

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from botocore.config import Config

# moto accepts any credentials; these are the ones every client of the test server uses.
DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
STARTUP_SECONDS = 30.0


@dataclass
class S3Server:
    """A running moto server: its endpoint and the dummy credentials to reach it with."""

    endpoint_url: str
    env: dict[str, str] = field(default_factory=lambda: dict(DUMMY_CREDENTIALS))

    def client(self) -> Any:
        """A synchronous boto3 S3 client for the server (path-style, dummy credentials)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name=self.env["AWS_DEFAULT_REGION"],
            config=Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str) -> str:
        """Create a bucket (moto keeps it for the session) and return its name."""
        self.client().create_bucket(Bucket=name)
        return name


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(url: str) -> bool:
    """True once the server answers HTTP at all (any status)."""
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port for the session, stopped at its end."""
    port = free_port()
    endpoint_url = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _answers(f"{endpoint_url}/moto-api/"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"moto server did not start on {endpoint_url}:\n{log_path.read_text()}"
                )
            time.sleep(0.1)
        yield S3Server(endpoint_url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
