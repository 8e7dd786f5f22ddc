"""Shards on an S3-compatible server (moto, started on loopback for this module and stopped after):
``mimae-shards build`` to it and ``verify`` from it, both loaders reading it with the same sample
identity as a local copy, a training epoch from it with every sample used once, a SIGKILL and an
exact resume, and the one-line exit-2 errors of a missing object and a wrong credential. The
webdataset loader also reads http:// (a loopback file server) and pipe: shards."""

from __future__ import annotations

import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from mimae_scale.config import load_config
from mimae_scale.data import build_train_loader, remote
from mimae_scale.data.loopback_s3 import S3Server
from mimae_scale.data.shardset import DataError, resolve_shards
from mimae_scale.engine.checkpoint import MARKER
from tests.helpers import REPO
from tests.helpers.shard_helpers import jpeg_bytes

pytestmark = pytest.mark.slow

CLASSES, PER_CLASS, SHARD_SIZE = 8, 12, 24  # 96 images in 4 shards
BUCKET = "shards"
TIMEOUT = 300
CLI = Path(sys.executable).parent / "mimae-shards"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, its bucket, and the standard AWS variables pointing at it (this process too)."""
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto.log")
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    server.client().create_bucket(Bucket=BUCKET)
    yield server
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="module")
def built(s3, tmp_path_factory) -> tuple[str, Path]:
    """``mimae-shards build`` of a class-folder tree to s3://shards/train; (url, staging dir)."""
    src = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (src / f"class{c}").mkdir()
        for i in range(PER_CLASS):
            (src / f"class{c}" / f"{i}.jpg").write_bytes(jpeg_bytes(rng))
    url, stage = f"s3://{BUCKET}/train", tmp_path_factory.mktemp("stage")
    cmd = [str(CLI), "build", str(src), url, "--stage", str(stage), "--shard-size", str(SHARD_SIZE), "--quiet",
           "--workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ, **s3.env()})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "96 inputs -> 96 samples in 4 shards" in done.stdout and f"10 objects uploaded to {url}" in done.stdout
    return url, stage


def _cli(s3: S3Server, *args: str, key_id: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, **s3.env(key_id=key_id)})


def test_build_uploads_then_verify_reads_and_finds_damage(s3, built):
    url, stage = built
    keys = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET, Prefix="train/")["Contents"])
    assert keys == sorted([f"train/{n}" for i in range(4) for n in (f"train-{i:06d}.tar", f"train-{i:06d}.idx")]
                          + ["train/manifest.json", "train/rejected.jsonl"])
    ok = _cli(s3, "verify", url, "--quiet")
    assert ok.returncode == 0 and ok.stdout == "" and f"{url}: OK" in ok.stderr, ok.stdout + ok.stderr
    # a re-run finds everything built and uploaded: only the manifest goes again
    again = _cli(s3, "build", str(Path(json.loads((stage / ".parts" / "build.json").read_text())["source"])), url,
                 "--stage", str(stage), "--shard-size", str(SHARD_SIZE), "--quiet", "--workers", "1")
    assert again.returncode == 0 and "; 1 objects uploaded" in again.stdout, again.stdout + again.stderr

    # damage: one tar replaced by another's bytes, one index gone -> one line each, exit 1
    bad = f"{BUCKET}-damaged"
    client = s3.client()
    client.create_bucket(Bucket=bad)
    for name in keys:
        if name != "train/train-000002.idx":
            body = (stage / "train-000000.tar" if name.endswith("000001.tar") else stage / Path(name).name).read_bytes()
            client.put_object(Bucket=bad, Key=name, Body=body)
    damaged = _cli(s3, "verify", f"s3://{bad}/train", "--quiet")
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    lines = damaged.stdout.splitlines()
    assert "train-000001.tar: checksum mismatch (file changed or damaged since it was written)" in lines, lines
    assert "train-000002.idx: missing index file" in lines, lines


def _epoch_labels(cfg_overrides: list[str], spec: str, backend: str) -> list[list[int]]:
    cfg = load_config("tiny", [f"data.train_shards={spec}", f"data.backend={backend}", "train.micro_batch=16",
                               "data.shuffle_buffer=8", *cfg_overrides])
    loader = build_train_loader(cfg, 0, 1, torch.device("cpu"))
    batches = [b["labels"][b["valid"]].tolist() for b in loader]
    return batches


@pytest.mark.parametrize("backend", ["dali", "webdataset"])
def test_loaders_read_s3_with_the_local_sample_identity(s3, built, backend, tmp_path):
    """The same shards from S3 and from the local staging copy: the same offsets (sample ids) and,
    batch for batch, the same samples in the same order; every sample once per epoch."""
    url, stage = built
    remote_set, local_set = resolve_shards(url, backend=backend), resolve_shards(str(stage))
    assert remote_set.tars == [f"{url}/train-{i:06d}.tar" for i in range(4)]
    assert [o.tolist() for o in remote_set.jpg_offsets] == [o.tolist() for o in local_set.jpg_offsets]
    run = [f"run_dir={tmp_path}"]
    from_s3, from_disk = _epoch_labels(run, url, backend), _epoch_labels(run, str(stage), backend)
    assert from_s3 == from_disk
    assert sorted(label for batch in from_s3 for label in batch) == sorted(c for c in range(CLASSES)
                                                                          for _ in range(PER_CLASS))


def test_webdataset_reads_http_and_pipe_shards(built, tmp_path):
    _, stage = built
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(stage))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        run = [f"run_dir={tmp_path}"]
        local = _epoch_labels(run, str(stage), "webdataset")
        web = f"http://127.0.0.1:{server.server_address[1]}"
        assert _epoch_labels(run, web, "webdataset") == local  # the manifest read over http
        assert _epoch_labels(run, f"pipe:cat {stage}/train-{{000000..000003}}.tar", "webdataset") == local
        with pytest.raises(DataError, match=r"data.backend=dali cannot read http shards"):
            resolve_shards(web, backend="dali")
        with pytest.raises(DataError, match=r"missing shard http://.*/train-000009.tar \(1 of 1 missing\)"):
            resolve_shards(f"{web}/train-000009.tar", backend="webdataset")
    finally:
        server.shutdown()


def _train(run: Path, overrides: list[str], s3: S3Server, key_id: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "mimae_scale/train.py", "--config", "tiny", f"run_dir={run}", *overrides]
    log = open(run.with_suffix(".log"), "a")  # noqa: SIM115 (closed by the child's end)
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, **s3.env(key_id=key_id), "OMP_NUM_THREADS": "1"})


def _steps_done(run: Path) -> list[int]:
    return sorted(int(p.parent.name.split("_")[1]) for p in (run / "checkpoints").glob(f"step_*/{MARKER}"))


def test_train_from_s3_sigkill_resume_every_sample_once(s3, built, tmp_path):
    """DALI reads the training shards from S3: killed (SIGKILL) after the checkpoint of step 2 of
    6, resumed, and the epoch's sample traces hold every sample exactly once."""
    url, _ = built
    run = tmp_path / "run"
    settings = [f"data.train_shards={url}", "data.backend=dali", "train.global_batch=16", "train.micro_batch=16",
                "checkpoint.every_steps=2", "checkpoint.every_minutes=600", "train.log_every=1",
                "data.trace_samples=true", "train.max_steps=6", "data.shuffle_buffer=16"]
    job = _train(run, settings, s3)
    deadline = time.monotonic() + TIMEOUT
    while 2 not in _steps_done(run) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    log = run.with_suffix(".log").read_text()
    assert 2 in _steps_done(run), log[-3000:]
    for tag in [t for t in (run / "checkpoints").glob("step_*") if t.name != "step_000000002"]:
        subprocess.run(["rm", "-rf", str(tag)], check=True)  # the kill came after step 2: resume from there
    (run / "checkpoints" / "latest").write_text("step_000000002\n")
    trace = run / "samples" / "rank00000.jsonl"
    before = [json.loads(line) for line in trace.read_text().splitlines()]

    resumed = _train(run, settings, s3)
    assert resumed.wait(timeout=TIMEOUT) == 0, run.with_suffix(".log").read_text()[-3000:]
    assert "resumed from" in run.with_suffix(".log").read_text()
    after = [json.loads(line) for line in trace.read_text().splitlines()][len(before):]
    used = [s for r in before if r["batch"] < 2 for s in r["samples"]] + [s for r in after for s in r["samples"]]
    assert {r["epoch"] for r in after} == {0} and [r["batch"] for r in after] == [2, 3, 4, 5]
    counts = Counter(used)
    assert len(counts) == CLASSES * PER_CLASS and set(counts.values()) == {1}, counts.most_common(3)
    assert all(name.startswith("train-00000") for name in counts)  # "tar name/key", as for local shards


def test_missing_object_and_wrong_credential_exit_2_with_one_line(s3, built, tmp_path):
    url, _ = built
    cases = {
        "missing": ([f"data.train_shards={url}/train-{{000000..000004}}.tar"], None,
                    f"missing shard {url}/train-000004.tar (1 of 5 missing)"),
        "credential": ([f"data.train_shards={url}"], "AKIAWRONGWRONGWRONG0",
                       f"{url}/manifest.json: InvalidAccessKeyId: The AWS Access Key Id you provided does not exist"),
    }
    jobs = {name: _train(tmp_path / name, [*overrides, "data.backend=dali"], s3, key_id)
            for name, (overrides, key_id, _) in cases.items()}
    for name, job in jobs.items():
        assert job.wait(timeout=TIMEOUT) == 2
        out = (tmp_path / name).with_suffix(".log").read_text()
        errors = [line for line in out.splitlines() if "ERROR" in line]
        assert "Traceback" not in out and len(errors) == 1, out[-3000:]
        assert "DataError: data.train_shards=" in errors[0] and cases[name][2] in errors[0], errors


def test_remote_helpers_name_what_they_cannot_do():
    assert remote.index_url("s3://b/p/train-000001.tar") == "s3://b/p/train-000001.idx"
    assert remote.index_url("pipe:curl -s https://h/x.tar | cat") == "pipe:curl -s https://h/x.idx | cat"
    with pytest.raises(DataError, match="gs:// shards are not supported"):
        resolve_shards("gs://bucket/train")


def test_remote_cache_fetches_each_tar_once_keeps_its_limit_and_notices_changes(s3, built, tmp_path, monkeypatch):
    """data.remote_cache: DALI reads local copies (the same batches as the local set), fetched once;
    copies of another set go when room is needed, least recently used first; a set larger than
    the limit is refused; a changed object is fetched again."""
    url, stage = built
    cache = tmp_path / "cache"
    fetched = []
    download = remote.download
    monkeypatch.setattr(remote, "download", lambda u, local: (fetched.append(u), download(u, local))[1])
    size = sum(f.stat().st_size for f in stage.iterdir() if f.suffix in (".tar", ".idx"))
    old = cache / "other-bucket" / "old.tar"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"\0" * 4096)
    os.utime(old, (0, 0))  # least recently used
    settings = [f"run_dir={tmp_path}", f"data.remote_cache={cache}", f"data.remote_cache_gb={(size + 100) / 1e9}"]
    assert _epoch_labels(settings, url, "dali") == _epoch_labels([f"run_dir={tmp_path}"], str(stage), "dali")
    assert sorted(fetched) == sorted(f"{url}/train-{i:06d}.{ext}" for i in range(4) for ext in ("tar", "idx"))
    assert not old.exists()  # 4 KB more than the limit allowed: the other set's copy went
    assert sorted(p.name for p in (cache / BUCKET / "train").iterdir() if p.suffix != ".etag") == sorted(
        f"train-{i:06d}.{ext}" for i in range(4) for ext in ("tar", "idx"))

    fetched.clear()
    _epoch_labels(settings, url, "dali")
    assert fetched == []  # all there, unchanged
    s3.client().upload_file(str(stage / "train-000001.tar"), BUCKET, "train/train-000003.tar")  # changed object
    cfg = load_config("tiny", [*settings, f"data.train_shards={url}"])
    with pytest.raises(DataError, match=r"more than data.remote_cache_gb") as too_small:
        build_train_loader(load_config("tiny", [*settings, f"data.train_shards={url}",
                                                "data.remote_cache_gb=1e-6"]), 0, 1, torch.device("cpu"))
    assert "more than data.remote_cache_gb=1e-06" in str(too_small.value)
    from mimae_scale.data.cache import cached
    cached(resolve_shards(url), str(cache), cfg.data.remote_cache_gb + 1, "test")
    assert fetched == [f"{url}/train-000003.tar"]
    assert (cache / BUCKET / "train" / "train-000003.tar").read_bytes() == (stage / "train-000001.tar").read_bytes()
    s3.client().upload_file(str(stage / "train-000003.tar"), BUCKET, "train/train-000003.tar")  # put it back


def test_dali_goes_on_with_the_rest_of_an_epoch_from_s3(s3, built, tmp_path):
    """The rest-of-epoch pass (another layout's resume): local index files listing the unused
    samples of s3:// tars; with the samples used before, every sample exactly once."""
    url, _ = built
    cfg = load_config("tiny", [f"run_dir={tmp_path}", f"data.train_shards={url}", "data.backend=dali",
                               "train.micro_batch=16", "data.shuffle_buffer=8", "data.trace_samples=true"])
    first = build_train_loader(cfg, 0, 1, torch.device("cpu"))
    batches = iter(first)
    next(batches), next(batches)
    state = first.state_dict()
    rest = build_train_loader(cfg, 0, 1, torch.device("cpu"))
    summary = rest.continue_epoch([state], steps_left=4, accumulation=1)
    assert summary == {"epoch": 0, "used": 32, "left": 64, "repeated": 0}
    list(rest)
    records = [json.loads(line) for line in (tmp_path / "samples" / "rank00000.jsonl").read_text().splitlines()]
    assert [r["rest"] for r in records] == [False] * 2 + [True] * 4
    counts = Counter(name for r in records for name in r["samples"])
    assert len(counts) == CLASSES * PER_CLASS and set(counts.values()) == {1}


def test_profile_credentials_and_the_endpoint_setting(s3, built, tmp_path):
    """No AWS_* key or endpoint variable: the key from a profile in the shared credentials file
    (AWS_PROFILE), the endpoint from data.s3_endpoint_url; DALI and boto3 both use them."""
    url, _ = built
    (tmp_path / "credentials").write_text(f"[trainer]\naws_access_key_id = {s3.key_id}\n"
                                          f"aws_secret_access_key = {s3.secret}\n"
                                          f"[other]\naws_access_key_id = AKIAWRONGWRONGWRONG0\n"
                                          f"aws_secret_access_key = {s3.secret}\n")
    (tmp_path / "config").write_text("[profile trainer]\nregion = us-east-1\n[profile other]\nregion = us-east-1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_PROFILE="trainer", AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "credentials"),
               AWS_CONFIG_FILE=str(tmp_path / "config"))
    script = (
        "import sys, torch\n"
        "from mimae_scale.config import load_config\n"
        "from mimae_scale.data import build_train_loader\n"
        "cfg = load_config('tiny', sys.argv[1:])\n"
        "print(sum(int(b['valid'].sum()) for b in build_train_loader(cfg, 0, 1, torch.device('cpu'))))\n"
    )
    args = [f"run_dir={tmp_path}", f"data.train_shards={url}", "data.backend=dali", "train.micro_batch=16",
            f"data.s3_endpoint_url={s3.url}"]
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0 and done.stdout.split() == [str(CLASSES * PER_CLASS)], done.stderr[-3000:]
    other = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env={**env, "AWS_PROFILE": "other"},
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert other.returncode != 0 and "InvalidAccessKeyId" in other.stderr  # the profile is what is used


def test_remote_cache_ranks_on_one_machine_fetch_each_object_once(s3, built, tmp_path):
    """Two processes fill one empty cache at the same time: the lock makes one fetch everything
    and the other find it (8 objects fetched in all, not 16)."""
    url, _ = built
    # both wait until both are ready, so that without the lock both would find the cache empty
    script = ("import logging, os, sys, time\n"
              "from pathlib import Path\n"
              "from mimae_scale.data.cache import cached\n"
              "from mimae_scale.data.shardset import resolve_shards\n"
              "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(message)s')\n"
              "shards = resolve_shards(sys.argv[1])\n"
              "Path(sys.argv[3], str(os.getpid())).touch()\n"
              "while len(os.listdir(sys.argv[3])) < 2: time.sleep(0.001)\n"
              "cached(shards, sys.argv[2], 0, 'rank')\n")
    (tmp_path / "ready").mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", script, url, str(tmp_path / "cache"), str(tmp_path / "ready")],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=TIMEOUT)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    fetched = sorted(int(line.split(": ")[1].split(" of ")[0]) for out in outputs for line in out.splitlines()
                     if "objects fetched" in line)
    assert fetched == [0, 8], outputs
