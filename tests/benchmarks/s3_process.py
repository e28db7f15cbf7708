"""A real S3 API server on 127.0.0.1: moto's, in a process of its own, for the tests
(tests/s3_server.py) and the bucket benchmark (buckets.py).

moto answers S3's REST API as AWS documents it (ListObjectsV2, conditional PUTs with
If-None-Match and If-Match, 404 NoSuchKey), so the client is tested over HTTP against a server
written apart from this project, not against mocks of its own library.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

ACCESS_KEY = "AKIATESTACCESSKEY0123"
SECRET_KEY = "s3-test-secret-do-not-leak-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    port: int = field(default_factory=_free_port)

    def __post_init__(self) -> None:
        self.url = f"http://127.0.0.1:{self.port}"
        self._process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{self.url}/moto-api/", timeout=1)
                return
            except httpx.TransportError:
                assert self._process.poll() is None, "moto's server did not start"
                assert time.monotonic() < deadline, "moto's server did not answer within 60 s"
                time.sleep(0.1)

    @property
    def env(self) -> dict[str, str]:
        """The environment a user sets for an S3-compatible endpoint, as the AWS CLI reads it."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.url, "AWS_ALLOW_HTTP": "true"}

    def _client(self) -> Any:
        import boto3  # comes with moto[server]; a client written apart from the one under test

        return boto3.client("s3", endpoint_url=self.url, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def new_bucket(self) -> str:
        """A new, empty bucket; its name."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        self._client().create_bucket(Bucket=name)
        return name

    def put(self, url: str, data: bytes) -> None:
        bucket, key = url.removeprefix("s3://").split("/", 1)
        self._client().put_object(Bucket=bucket, Key=key, Body=data)

    def get(self, url: str) -> bytes:
        bucket, key = url.removeprefix("s3://").split("/", 1)
        body: bytes = self._client().get_object(Bucket=bucket, Key=key)["Body"].read()
        return body

    def keys(self, url: str) -> list[str]:
        """Every key in the bucket of an s3:// URL."""
        bucket = url.removeprefix("s3://").split("/", 1)[0]
        pages = self._client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)

    def cpu_s(self) -> float:
        """The server process's CPU so far (user + system), from /proc."""
        fields = open(f"/proc/{self._process.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
