"""The index half of `pipeline bench`: how long opening a store of many commit records takes, and how many
requests it costs, on a local disk and on an S3-protocol server whose every request is made slower.

A store of all of DROID holds ~12k commit records (92k episodes, 8 a part); every command, and every
training rank, opens it at its start. Measured here on synthetic records (copies of one view, each its own
record, pointing at no data: opening reads records, not arrays):

- open = what every command does first: the listing, the records (or the index snapshot and the records
  it does not hold), the view columns, the winners, and the training split's window index;
- locally and on moto's S3 server on loopback behind `LatencyProxy`, which adds a fixed delay to every
  request (20 ms: a remote object store's first-byte latency) and counts them;
- each without an index snapshot (every record fetched, concurrently) and with one (`FeatureStore.compact`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.store import INDEX_DIR, CommitRecord, FeatureStore, ViewRecord
from stages.bench.loader import fresh_s3_clients, s3_server
from stages.train.windows import WindowIndex

METHODS = (b"GET ", b"PUT ", b"HEAD ", b"POST ", b"DELETE ")


class LatencyProxy:
    """A TCP proxy on loopback in front of an HTTP server that holds every request `delay` seconds before
    passing it on, and counts the requests (each starts with its method: clients here do not pipeline)."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target, self.delay, self.requests = target, delay, 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = self._listener.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if requests and data.startswith(METHODS):
                    with self._lock:
                        self.requests += 1
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()


def synthetic_records(fingerprint: str, records: int, views_per_record: int, frames: int = 66
                      ) -> list[tuple[str, bytes]]:
    """(file name, JSON) of `records` commit records of `views_per_record` views each, distinct view and
    episode ids (8 views an episode: two cameras x four phases, as DROID at 4 fps with `views.phase: all`)."""
    template = ViewRecord("", "", "/data/lab/episode", "left_mp4_path", "123", 0, 4, 15.0, [720, 1280],
                          [0, 154, 720, 972], {"trajectory.h5": [1, 2], "recordings/MP4/123.mp4": [3, 4]},
                          "", "", 0, frames, {"features": list(range(1, frames + 1)), "states": 1, "actions": 2,
                                              "frame_index": 3}, 15.0)
    out, n = [], 0
    for r in range(records):
        part, attempt = f"part{r:06d}", "20260101T000000Z-0000000000"
        views = []
        for k in range(views_per_record):
            views.append(dataclasses.replace(template, view_id=f"{n:020x}", episode_id=f"lab/episode{n // 8:06d}",
                                             part=part, attempt=attempt, start=k * frames, phase=n % 4))
            n += 1
        record = CommitRecord(f"{part}.{attempt}", part, attempt, views_per_record * frames, 1.7e9 + r, views)
        out.append((f"{record.name}.json", json.dumps(record.to_json(fingerprint), indent=1).encode()))
    return out


def open_seconds(url: str, spec: dict[str, Any], frames_per_clip: int = 16) -> tuple[float, dict[str, Any]]:
    """Seconds to open the store as a command does: the index, the committed views, the window index."""
    t0 = time.perf_counter()
    store = FeatureStore(url, spec)
    index = store.index()
    windows = WindowIndex.from_table(index.committed(), split="all", frames_per_clip=frames_per_clip)
    seconds = time.perf_counter() - t0
    return seconds, {"views": len(index.committed()), "snapshot": index.snapshot is not None,
                     "records_read_one_by_one": index.read_one_by_one, "episodes": len(windows.episodes),
                     "index_MB": index.views.nbytes / 1e6}


def bench_index(tmp: str, records: int = 12000, views_per_record: int = 1, delay: float = 0.02,
                echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Opening a store of `records` synthetic commit records locally and on S3 behind a `delay` per request,
    without and with an index snapshot."""
    spec = {"bench": "index"}
    local = FeatureStore(f"{tmp}/index-store", spec).create()
    files = synthetic_records(local.digest, records, views_per_record)
    folder = Path(local.root, "commits")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files:
        (folder / name).write_bytes(data)
    out: dict[str, Any] = {"records": records, "views_per_record": views_per_record,
                           "record_MB": sum(len(d) for _, d in files) / 1e6}
    out["local"] = _open_both_ways(local.cache_path, spec)
    echo(f"bench index: local disk done ({out['local']['open_seconds']:.2f} s); now S3 (uploads the records first)")
    out["s3"] = _s3(files, local, spec, delay, echo)
    return out


def _open_both_ways(url: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Open without an index snapshot, write one, open again."""
    plain, facts = open_seconds(url, spec)
    FeatureStore(url, spec).compact(min_records=1)
    snap, snap_facts = open_seconds(url, spec)
    return {"open_seconds": plain, "open_seconds_snapshot": snap, **facts, "index_MB_snapshot": snap_facts["index_MB"]}


def _s3(files: list[tuple[str, bytes]], local: FeatureStore, spec: dict[str, Any], delay: float,
        echo: Callable[[str], None]) -> dict[str, Any]:
    """The same records on moto's S3 server, read through a `LatencyProxy` (skipped where moto is missing)."""
    try:
        with s3_server() as endpoint:
            url = f"s3://index-{int(time.time())}/cache"
            store = FeatureStore(url, spec)
            store.fs.mkdir(url.split("/")[2])
            store.create()
            store.fs.pipe({f"{store.root}/commits/{name}": data for name, data in files})
            host, port = endpoint.removeprefix("http://").split(":")
            proxy = LatencyProxy((host, int(port)), delay)
            os.environ["AWS_ENDPOINT_URL"] = proxy.url  # restored by s3_server
            try:
                out = _open_counted(url, spec, proxy)
                snapshot = next(iter(local.snapshots()[-1:]), None)
                if snapshot is not None:  # the local store's snapshot holds the same records
                    data = Path(local.root, INDEX_DIR, f"{snapshot}.parquet").read_bytes()
                    store.fs.pipe_file(f"{store.root}/{INDEX_DIR}/{snapshot}.parquet", data)
                    with_snapshot = _open_counted(url, spec, proxy)
                    out |= {"open_seconds_snapshot": with_snapshot["open_seconds"],
                            "requests_snapshot": with_snapshot["requests"]}
            finally:
                proxy.close()
            return {**out, "delay_per_request_s": delay}
    except ImportError as err:
        return {"skipped": f"{err.name} is not installed (pip install -e '.[test]')"}


def _open_counted(url: str, spec: dict[str, Any], proxy: LatencyProxy) -> dict[str, Any]:
    fresh_s3_clients()  # a new process's client: nothing cached, the proxy's endpoint
    before = proxy.requests
    seconds, facts = open_seconds(url, spec)
    return {"open_seconds": seconds, "requests": proxy.requests - before, **facts}
