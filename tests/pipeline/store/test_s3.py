"""`cache.path` as an s3:// URL against a real S3-protocol server on loopback (moto's server, s3fs client).

The endpoint and credentials come from the standard AWS environment variables, as on a cluster: nothing
about the object store is in the manifest except the URL.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.errors import DamagedDataError
from pipeline.manifest import Manifest, load_manifest
from pipeline.store.store import FeatureStore
from stages.cache.fingerprint import fingerprint_spec
from stages.cache.status import status_report
from stages.cache.verify import verify
from stages.extract.driver import extract
from stages.train.loop import train

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

TRAIN = ["predictor.embed_dim=32", "predictor.depth=1", "predictor.num_heads=1", "train.global_batch_size=4",
         "train.warmup_steps=1", "train.constant_steps=28", "train.decay_steps=1", "train.heldout_fraction=0",
         "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=10", "train.loader_threads=1",
         "train.device=cpu"]


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port for this module, with one bucket."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh bucket on the server; the AWS variables a cluster job would set (subprocesses inherit them)."""
    import s3fs

    for key, value in {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    bucket = f"cache-{request.node.name.lower().replace('_', '-')[:40]}-{int(time.time() * 1000) % 100000}"
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(bucket)
    return f"s3://{bucket}/features"


def load(workdir: Path, url: str, *overrides: str) -> Manifest:
    return load_manifest(workdir / "manifest.yaml", None, [f"cache.path={url}", *TRAIN, *overrides])


def quiet_extract(m: Manifest):
    return extract(m, show_progress=False, echo=lambda _: None)


def test_extract_status_verify_train_and_repair_on_s3(workdir: Path, s3: str,
                                                      same_features: Callable[..., None]) -> None:
    m = load(workdir, s3)
    assert quiet_extract(m).views_done == 6
    assert quiet_extract(m).views_done == 0
    assert status_report(m).views_committed == 6
    assert verify(m, show_progress=False).sound
    assert train(m, workdir / "run", steps=2, show_progress=False, echo=lambda _: None).end_step == 2

    store = FeatureStore(m.cache.path, fingerprint_spec(m))
    commit = store.commits()[0]
    key = f"{store.root}/parts/{commit.part}/{commit.attempt}/states/c/0/0"
    raw = bytearray(store.fs.cat_file(key))
    raw[9] ^= 0x01
    store.fs.pipe_file(key, bytes(raw))  # a damaged object
    found = verify(m, show_progress=False)
    assert not found.sound and all("states" in p.where for p in found.problems)
    damaged = {v.view_id for v in commit.views}
    with pytest.raises(DamagedDataError):
        train(m, workdir / "run-damaged", steps=30, show_progress=False, echo=lambda _: None)
    verify(m, repair=True, show_progress=False)
    assert quiet_extract(m).views_done == len(damaged)
    assert verify(m, show_progress=False).sound
    local = load(workdir, str(workdir / "local-cache"))
    quiet_extract(local)
    same_features(FeatureStore(m.cache.path, fingerprint_spec(m)),
                  FeatureStore(local.cache.path, fingerprint_spec(local)))


EXTRACT = """
import sys
from pipeline.manifest import load_manifest
from stages.extract.driver import extract
extract(load_manifest(sys.argv[1], None, sys.argv[2:]), show_progress=False, echo=lambda _: None)
"""


def _killed(cmd: list[str], ready: Callable[[], bool], timeout: float = 120) -> None:
    """Start `cmd`, SIGKILL it as soon as `ready()` (it must still be running then)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, "the process ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_9_of_extract_and_of_train_on_s3_then_resume(workdir: Path, s3: str) -> None:
    overrides = [f"cache.path={s3}", "encoder.batch_size=2", "extract.episodes_per_part=1"]
    m = load(workdir, s3, *overrides[1:])
    store = FeatureStore(m.cache.path, fingerprint_spec(m))
    _killed([sys.executable, "-c", EXTRACT, str(workdir / "manifest.yaml"), *TRAIN, *overrides],
            lambda: bool(store.attempts()) and len(store.index(refresh=True).records) < 3)
    assert status_report(m).views_committed < 6
    quiet_extract(m)
    assert status_report(m).views_committed == 6 and verify(m, show_progress=False).sound

    def cli(run: Path) -> list[str]:
        sets = [x for o in (*TRAIN, *overrides) for x in ("--set", o)]
        return [sys.executable, "-m", "pipeline.cli", "train", "-m", str(workdir / "manifest.yaml"), *sets,
                "--out", str(run), "--steps", "30"]

    def rows(run: Path) -> list[dict]:
        path = run / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    run = workdir / "killed-run"
    _killed(cli(run), lambda: (run / "checkpoints" / "latest.pt").exists() and len(rows(run)) >= 13)
    subprocess.run(cli(run), check=True, capture_output=True, timeout=240)
    whole = workdir / "whole-run"
    subprocess.run(cli(whole), check=True, capture_output=True, timeout=240)
    assert [(r["step"], r["loss"]) for r in rows(run)] == [(r["step"], r["loss"]) for r in rows(whole)]


def test_opening_a_store_costs_one_listing_and_a_snapshot_not_a_request_per_record(
        s3: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests counted on the wire (a proxy in front of the server): opening lists commits/ and index/ once,
    reads the newest index snapshot and only the records committed after it."""
    from stages.bench.index import LatencyProxy, synthetic_records
    from stages.bench.loader import fresh_s3_clients

    spec = {"x": "requests"}
    store = FeatureStore(s3, spec).create()
    files = synthetic_records(store.digest, 300, 2)
    store.fs.pipe({f"{store.root}/commits/{name}": data for name, data in files[:297]})
    assert store.compact(min_records=1)
    store.fs.pipe({f"{store.root}/commits/{name}": data for name, data in files[297:]})
    host, port = s3_endpoint.removeprefix("http://").split(":")
    proxy = LatencyProxy((host, int(port)), delay=0.0)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)

    def requests_to_open() -> tuple[int, int]:
        fresh_s3_clients()
        before = proxy.requests
        index = FeatureStore(s3, spec).index()
        assert len(index.committed()) == 600
        return proxy.requests - before, index.read_one_by_one

    try:
        assert requests_to_open() == (2 + 1 + 3, 3)  # two listings, the snapshot, three newer records
        for snapshot in store.snapshots():
            store.fs.rm(f"{store.root}/index/{snapshot}.parquet")
        requests, one_by_one = requests_to_open()  # without one: every record, each fetched once
        assert one_by_one == 300 and 300 + 2 <= requests <= 300 + 4  # (an empty listing may cost a look more)
    finally:
        proxy.close()
