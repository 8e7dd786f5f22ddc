"""A real S3-compatible server on loopback for the remote-shard tests and ``mimae-bench data
--remote``: moto in server mode (``pip install 'moto[server]'``, in the dev extra).

It runs as its own process, never as a thread of the test: DALI's pipeline build holds the GIL
while its S3 client waits for an answer, so an in-process server (``ThreadedMotoServer``) never
answers and DALI fails with curl's "Timeout was reached" (measured with DALI 2.4.0).

Authentication is on (``INITIAL_NO_AUTH_ACTION_COUNT``): the first three requests create an IAM
user with full S3 access and its key; every later request must be signed with that key, so a
wrong credential is refused the way AWS refuses it (``InvalidAccessKeyId``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3

REGION = "us-east-1"
S3_ALL = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, log: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3", "MOTO_ALLOW_NONEXISTENT_REGION": "true"}
        self._log = open(log, "w")  # noqa: SIM115 (the server's lifetime)
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/moto-api/data.json", timeout=1).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.05)
        iam = boto3.client("iam", endpoint_url=self.url, region_name=REGION, aws_access_key_id="bootstrap",
                           aws_secret_access_key="bootstrap")
        iam.create_user(UserName="trainer")
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=S3_ALL)
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def env(self, *, key_id: str | None = None) -> dict[str, str]:
        """The standard AWS variables for this server (``key_id``: another, e.g. a wrong, key); no
        profile or config file of the machine leaks in."""
        return {"AWS_ACCESS_KEY_ID": key_id or self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": self.url,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def client(self):
        return boto3.client("s3", endpoint_url=self.url, region_name=REGION, aws_access_key_id=self.key_id,
                            aws_secret_access_key=self.secret)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
