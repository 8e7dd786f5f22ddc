"""Shards that are not on a local filesystem: ``s3://``, ``http(s)://`` and ``pipe:`` locations.

Who reads what (docs/DATA.md, "Remote shards"):

* DALI 2.4 reads ``s3://`` tars *and* ``s3://`` index files itself (its bundled AWS C++ SDK, on a
  CPU-only pipeline too), with the standard AWS credential chain and ``AWS_ENDPOINT_URL`` for an
  S3-compatible store. It reports a sample's source as ``"s3://bucket/key.tar:offset:name"``: the
  same offsets as for a local copy, so sample identity, exact resume and resume on another layout
  need nothing remote-specific. DALI cannot read ``http(s)://`` or ``pipe:``.
* The webdataset library opens ``http(s)://`` (curl) and ``pipe:`` itself; it has no ``s3`` scheme,
  so :func:`register_webdataset_s3` adds one that streams the object with boto3.
* This module reads what the shard set resolution needs before any reader starts (the manifest,
  the index files, the first block of each tar) and writes a build's objects, with boto3 for S3
  (``pip install 'mimae-scale[s3]'``), urllib for http(s), and the shell for ``pipe:``.

``gs://`` is refused: the installed DALI has a GCS client, but nothing here reads a GCS manifest or
index, and no test server covers it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

DALI_SCHEMES = ("s3",)  # what fn.readers.webdataset reads itself (besides local files)
WDS_SCHEMES = ("s3", "http", "https", "pipe")
PARALLEL_READS = 16  # manifest/index/header reads at start-up: round trips, not bandwidth


class RemoteError(OSError):
    """A remote object that cannot be read or written; the message is one line naming the URL."""


class RemoteMissing(RemoteError, FileNotFoundError):
    """The object (or bucket) does not exist."""


def scheme(spec: str) -> str | None:
    """``"s3"``, ``"gs"``, ``"http"``, ``"https"`` or ``"pipe"``; None for a local path."""
    if spec.startswith("pipe:"):
        return "pipe"
    head, sep, _ = spec.partition("://")
    return head.lower() if sep and head.lower() in ("s3", "gs", "http", "https") else None


def is_remote(spec: str) -> bool:
    return scheme(spec) is not None


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def index_url(tar: str) -> str:
    """The DALI index beside a remote tar: the last ``.tar`` becomes ``.idx`` (for ``pipe:``, in the
    command, so ``pipe:curl -s URL/x.tar`` has ``pipe:curl -s URL/x.idx``)."""
    at = tar.rfind(".tar")
    return tar[:at] + ".idx" + tar[at + len(".tar"):] if at >= 0 else tar + ".idx"


def use_endpoint(url: str) -> None:
    """``data.s3_endpoint_url``: exported as ``AWS_ENDPOINT_URL``, the one endpoint setting DALI's S3
    client reads (boto3 reads it too). Empty: the environment's, else AWS."""
    if url:
        os.environ["AWS_ENDPOINT_URL"] = url


def split_s3(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise RemoteError(f"{url}: no bucket (expected s3://bucket/key)")
    return bucket, key


# -- S3 -----------------------------------------------------------------------------------------

_client_lock = threading.Lock()
_clients: dict[tuple[int, str | None], Any] = {}


def s3_client():
    """A boto3 S3 client from the standard chain (environment, ``AWS_PROFILE``, config files,
    instance roles), the endpoint from ``AWS_ENDPOINT_URL`` when set: the same settings DALI reads.
    One per process (boto3 clients are thread safe; a forked child makes its own)."""
    key = (os.getpid(), os.environ.get("AWS_ENDPOINT_URL") or None)
    with _client_lock:
        if key not in _clients:
            try:
                import boto3
                from botocore.config import Config
            except ImportError:
                raise RemoteError("s3:// shards need boto3: pip install 'mimae-scale[s3]'") from None
            config = Config(max_pool_connections=PARALLEL_READS, retries={"max_attempts": 3})
            _clients[key] = boto3.session.Session().client("s3", endpoint_url=key[1], config=config)
        return _clients[key]


def _s3_error(url: str, exc: Exception) -> RemoteError:
    """One line for a botocore failure: a missing object/bucket apart, the service's code otherwise
    (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied, ...)."""
    response = getattr(exc, "response", None) or {}
    err = response.get("Error", {})
    code = str(err.get("Code", type(exc).__name__))
    message = err.get("Message") or str(exc).splitlines()[0]
    if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
        return RemoteMissing(f"{url}: " + ("no such bucket" if code == "NoSuchBucket" else "no such object"))
    if code == "403" and not err.get("Message"):  # HEAD answers carry no body: name the likely causes
        message = "Forbidden (wrong credentials, or no permission for this object)"
    return RemoteError(f"{url}: {code}: {message}")


def _s3_call(url: str, fn, **kw):
    try:
        return fn(**kw)
    except Exception as exc:
        if type(exc).__module__.startswith(("botocore", "boto3")):
            raise _s3_error(url, exc) from None
        raise


# -- reading ------------------------------------------------------------------------------------

def read_bytes(url: str, start: int = 0, length: int | None = None) -> bytes:
    """``url``'s bytes ``[start, start + length)`` (all of them when ``length`` is None)."""
    kind = scheme(url)
    span = f"bytes={start}-" + ("" if length is None else str(start + length - 1))
    if kind == "s3":
        bucket, key = split_s3(url)
        ranged = {"Range": span} if start or length is not None else {}
        # the body is read inside the call too: a connection lost mid-read is one line as well
        return _s3_call(url, lambda **kw: s3_client().get_object(**kw)["Body"].read(), Bucket=bucket, Key=key,
                        **ranged)
    if kind in ("http", "https"):
        request = urllib.request.Request(url, headers={"Range": span} if start or length is not None else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                data = response.read()
                ranged = response.status == 206
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise RemoteMissing(f"{url}: no such object (HTTP 404)") from None
            raise RemoteError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise RemoteError(f"{url}: {getattr(exc, 'reason', exc)}") from None
        return data if ranged else data[start: None if length is None else start + length]
    if kind == "pipe":
        return _pipe_bytes(url, start, length)
    raise RemoteError(f"{url}: {kind}:// is not supported here (s3://, http(s)://, pipe: are)")


def _pipe_bytes(url: str, start: int, length: int | None) -> bytes:
    """A ``pipe:`` command's output (read to ``start + length`` and then stopped, for a header)."""
    cmd = url[len("pipe:"):]
    # its own process group: a header read stops the whole pipeline (the shell and what it started),
    # or a child still holding stderr open would block the read below
    with subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True) as proc:
        data = proc.stdout.read() if length is None else proc.stdout.read(start + length)
        if length is not None:
            os.killpg(proc.pid, signal.SIGKILL)
        err = proc.stderr.read().decode(errors="replace").strip().splitlines()
        status = proc.wait()
    if (length is None and status != 0) or not data:
        why = err[-1] if err else f"exit status {status}, no output"
        raise RemoteMissing(f"{url}: command failed: {why} ({shlex.split(cmd)[0] if cmd.strip() else 'empty'})")
    return data[start: None if length is None else start + length]


def read_text(url: str) -> str:
    return read_bytes(url).decode()


def read_many(urls: list[str], fn=read_bytes) -> list[Any]:
    """``fn(url)`` for each URL, ``PARALLEL_READS`` at a time (start-up reads are latency bound)."""
    with ThreadPoolExecutor(PARALLEL_READS) as pool:
        return list(pool.map(fn, urls))


def list_tars(root: str) -> list[str]:
    """The ``.tar`` objects directly under an ``s3://`` prefix, sorted (http and pipe cannot list)."""
    if scheme(root) != "s3":
        raise RemoteError(f"{root}: cannot list a {scheme(root)} location: name the tars (a brace pattern) "
                          "or give the shard set's manifest.json")
    bucket, prefix = split_s3(join(root, ""))
    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
    try:
        keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    except Exception as exc:
        raise _s3_error(root, exc) from None
    return sorted(f"s3://{bucket}/{k}" for k in keys if k.endswith(".tar"))


# -- writing and copying (mimae-shards build / verify) --------------------------------------------

def upload(local: Path, url: str) -> None:
    bucket, key = split_s3(url)
    _s3_call(url, s3_client().upload_file, Filename=str(local), Bucket=bucket, Key=key)


def object_head(url: str) -> tuple[int, str]:
    """(size in bytes, ETag) of an ``s3://`` object; :class:`RemoteMissing` when there is none."""
    bucket, key = split_s3(url)
    head = _s3_call(url, s3_client().head_object, Bucket=bucket, Key=key)
    return int(head["ContentLength"]), str(head.get("ETag", ""))


def object_size(url: str) -> int | None:
    """The object's size in bytes; None when it does not exist."""
    bucket, key = split_s3(url)
    try:
        return int(_s3_call(url, s3_client().head_object, Bucket=bucket, Key=key)["ContentLength"])
    except RemoteMissing:
        return None


def download(url: str, local: Path) -> None:
    if scheme(url) == "s3":
        bucket, key = split_s3(url)
        _s3_call(url, s3_client().download_file, Bucket=bucket, Key=key, Filename=str(local))
    else:
        local.write_bytes(read_bytes(url))


# -- the webdataset library's s3 scheme ---------------------------------------------------------

def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
    if mode[0] != "r":
        raise RemoteError(f"{url}: the webdataset s3 scheme only reads")
    bucket, key = split_s3(url)
    return _s3_call(url, s3_client().get_object, Bucket=bucket, Key=key)["Body"]  # a stream; tarfile reads it


def register_webdataset_s3() -> None:
    """Let ``webdataset`` open ``s3://`` URLs (streamed through boto3); leaves any handler a user set."""
    import importlib

    schemes = importlib.import_module("webdataset.gopen").gopen_schemes  # the package re-exports a function gopen
    schemes.setdefault("s3", _gopen_s3)
