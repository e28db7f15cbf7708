"""Manifests, images and output in a bucket, against a real S3 API server on 127.0.0.1 (moto's)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
import yaml

from pipeline import cli
from pipeline.aws_profile import profile_options
from pipeline.config import InputConfig, PromptConfig, load
from pipeline.errors import ConfigError, StoreError
from pipeline.manifest import Manifest
from pipeline.objects import Bucket
from pipeline.simulator import Simulator
from pipeline.store import columns, lease
from pipeline.store.lease import LEASE_FILE
from pipeline.store.parts import Store

from ..conftest import image_bytes, write_config
from ..runs import answered, finish, start_run, wait_for
from ..s3_server import ACCESS_KEY, SECRET_KEY, S3Server, throttling


def bucket_manifest(server: S3Server, folder: str, n: int, extra: Sequence[str] = ()) -> str:
    """n images and a CSV naming them relatively (and `extra` refs as written), in the bucket; its URL."""
    names = []
    for i in range(n):
        server.put(f"{folder}/images/img{i:03d}.png", image_bytes((64, 48), (i * 9 % 256, 40, 200)))
        names.append(f"images/img{i:03d}.png")
    csv = "image\n" + "\n".join([*names, *extra]) + "\n"
    server.put(f"{folder}/manifest.csv", csv.encode())
    return f"{folder}/manifest.csv"


def config_in(tmp_path: Path, sim: Simulator, manifest: str, out: str, **sections: Any) -> Path:
    return write_config(tmp_path, sim.url, manifest, output={"dir": out}, **sections)


def read_output(url: str) -> pl.DataFrame:
    """The output, read by Polars straight from the bucket (the environment says where it is)."""
    return pl.read_parquet(f"{url}/*.parquet")


def test_a_run_reads_manifest_and_images_from_a_bucket_and_writes_its_output_there(
    s3: str, s3_server: S3Server, sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    s3_server.put(f"{s3}/data/broken.png", b"\x89PNG\r\n\x1a\nnot really")
    s3_server.put(f"{s3}/elsewhere/abs.png", image_bytes((32, 32), "blue"))
    manifest = bucket_manifest(s3_server, f"{s3}/data", 6,
                               extra=["images/missing.png", "broken.png", f"{s3}/elsewhere/abs.png"])
    monkeypatch.chdir(tmp_path)
    cfg = config_in(tmp_path, sim, manifest, f"{s3}/out")

    assert cli.main(["run", str(cfg), "-q"]) == 1  # two rows fail, with their reasons
    capsys.readouterr()

    out = read_output(f"{s3}/out").sort("id")
    assert out.height == 9 and out["id"].n_unique() == 9
    by_status = out.group_by("status").len().sort("status")
    assert dict(by_status.iter_rows()) == {"error": 2, "ok": 7}
    errors = set(out.filter(pl.col("status") == "error")["error"])
    assert errors == {f"image: missing object {s3}/data/images/missing.png",
                      f"image: {s3}/data/broken.png is corrupt (OSError: Truncated File Read)"}
    assert answered(sim) == 7
    assert not (tmp_path / "out").exists()  # nothing of the output on local disk but the journal's folder
    run_info = json.loads(s3_server.get(f"{s3}/out/_run.json"))
    assert run_info["manifest"]["path"] == manifest
    assert json.loads(s3_server.get(f"{s3}/out/_lock.json"))["until"] == 0  # the lease is let go at the end

    assert cli.main(["report", f"{s3}/out", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows"] == 9 and report["by_status"] == {"error": 2, "ok": 7}


def test_a_second_run_resumes_from_what_the_bucket_holds_from_another_working_directory_and_cache(
    s3: str, s3_server: S3Server, sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = bucket_manifest(s3_server, f"{s3}/data", 10)
    cfg = config_in(tmp_path, sim, manifest, f"{s3}/out")
    assert cli.main(["run", str(cfg), "-q", "--limit", "4"]) == 0
    elsewhere = tmp_path / "another-machine"
    elsewhere.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(elsewhere / "cache"))
    monkeypatch.chdir(elsewhere)

    assert cli.main(["run", str(cfg), "-q"]) == 0

    out = read_output(f"{s3}/out")
    assert out.height == 10 and out["id"].n_unique() == 10
    assert answered(sim) == 10  # the 4 rows in the bucket were not asked again


def test_no_key_reaches_the_output_the_journal_or_a_message(
    s3: str, s3_server: S3Server, sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = bucket_manifest(s3_server, f"{s3}/data", 3, extra=["images/missing.png"])
    cfg = config_in(tmp_path, sim, manifest, f"{s3}/out")
    data = yaml.safe_load(cfg.read_text())
    data["storage_options"] = {"aws_secret_access_key": SECRET_KEY, "aws_access_key_id": ACCESS_KEY}
    cfg.write_text(yaml.safe_dump(data))

    assert cli.main(["run", str(cfg)]) == 1
    assert cli.main(["report", f"{s3}/out"]) == 0

    said = capsys.readouterr()
    written = [s3_server.get(f"s3://{s3.removeprefix('s3://')}/{key}") for key in s3_server.keys(s3)]
    written += [p.read_bytes() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    for secret in (SECRET_KEY, ACCESS_KEY):
        assert secret not in said.out + said.err
        assert not [blob[:80] for blob in written if secret.encode() in blob]
    run_info = json.loads(s3_server.get(f"{s3}/out/_run.json"))
    assert run_info["config"]["storage_options"] == ["aws_access_key_id", "aws_secret_access_key"]


def test_a_run_killed_again_and_again_resumes_from_another_working_directory_with_every_id_once(
    s3: str, s3_server: S3Server, faulty_sim: Callable[..., Simulator], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, concurrency, chance = 200, 8, random.Random(20261205)
    sim = faulty_sim(latency_s=0.01)
    cfg = config_in(tmp_path, sim, bucket_manifest(s3_server, f"{s3}/data", rows), f"{s3}/out",
                    limits={"concurrency": concurrency})
    first = tmp_path / "first"
    first.mkdir()
    monkeypatch.chdir(first)
    kills = 4
    for _ in range(kills):
        run = start_run(cfg)
        target = answered(sim) + chance.randint(1, 40)
        wait_for(lambda: answered(sim) >= target or run.poll() is not None, deadline_s=120)
        assert run.poll() is None, f"the run ended by itself before the kill: {run.communicate()}"
        run.send_signal(signal.SIGKILL)
        run.wait()
    assert "out/_lock.json" in s3_server.keys(s3)  # a killed run cannot let its lease go

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    finish(start_run(cfg))  # at once: the lease's holder was this machine's, with this journal, and is dead

    out = read_output(f"{s3}/out")
    assert out.height == rows and out["id"].n_unique() == rows and set(out["status"]) == {"ok"}
    assert answered(sim) <= rows + kills * concurrency
    assert not list(elsewhere.iterdir())  # nothing written where the command ran


def schema() -> pa.Schema:
    return columns.schema(pl.Schema(), ())


def test_a_second_machine_is_refused_while_the_lease_holds_and_takes_it_over_once_it_ends(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = f"{s3}/out"
    holder = Store(out, schema(), journal_dir=tmp_path / "machine-a")
    try:
        with pytest.raises(StoreError, match=f"another annotate run is writing to {out} .*pid"):  # this machine's lock
            Store(out, schema(), journal_dir=tmp_path / "machine-a")
        with pytest.raises(StoreError, match="another annotate run is writing to .*lease ends in"):
            Store(out, schema(), journal_dir=tmp_path / "machine-b")
    finally:
        holder.close()
    Store(out, schema(), journal_dir=tmp_path / "machine-b").close()  # let go: free for anyone

    stale = {"host": "machine-c", "pid": 1, "owner": "0123", "until": time.time() - 1}
    Bucket(out).write(LEASE_FILE, json.dumps(stale).encode())
    Store(out, schema(), journal_dir=tmp_path / "machine-b").close()  # a lease past its end is taken over


def refused(call: Callable[[], None]) -> bool:
    try:
        call()
    except StoreError:
        return True
    return False


def test_a_journal_folder_serves_one_output_only(s3: str, tmp_path: Path) -> None:
    Store(f"{s3}/one", schema(), journal_dir=tmp_path / "journal").close()
    with pytest.raises(StoreError, match=f"output.journal_dir: .*journal holds the journal of {s3}/one; give each"):
        Store(f"{s3}/two", schema(), journal_dir=tmp_path / "journal")


def test_a_run_whose_lease_was_taken_over_writes_no_more(
    s3: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lease, "RENEW_S", 0.05)
    out = f"{s3}/out"
    store = Store(out, schema(), journal_dir=tmp_path / "a")
    try:
        usurper = {"host": "other", "pid": 2, "owner": "4567", "until": time.time() + 60}
        Bucket(out).write(LEASE_FILE, json.dumps(usurper).encode())
        wait_for(lambda: refused(store.cut))
        with pytest.raises(StoreError, match="another run took over the lock"):
            store.cut()
    finally:
        with contextlib.suppress(StoreError):
            store.close()
    assert json.loads(Bucket(out).read(LEASE_FILE))["host"] == "other"  # not deleted by the loser


def test_a_folder_of_images_in_a_bucket_is_a_manifest(
    s3: str, s3_server: S3Server, sim: Simulator, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(3):
        s3_server.put(f"{s3}/photos/a/p{i}.jpg", image_bytes((40, 30), "green", "JPEG"))
    s3_server.put(f"{s3}/photos/notes.txt", b"not an image")
    s3_server.put(f"{s3}/photos/.hidden/x.jpg", image_bytes((40, 30), "green", "JPEG"))
    cfg = config_in(tmp_path, sim, f"{s3}/photos/", str(tmp_path / "out"))

    assert cli.main(["run", str(cfg), "-q"]) == 0

    out = pl.read_parquet(tmp_path / "out" / "*.parquet")
    assert out.height == 3 and set(out["status"]) == {"ok"} and answered(sim) == 3
    assert f"skipped 1 file in {s3}/photos/ that Pillow cannot read as images: notes.txt" in caplog.text


def test_estimate_reads_headers_from_the_bucket_as_from_local_disk_with_ranged_reads(
    s3: str, s3_server: S3Server, sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = [(2000, 1500), (640, 480), (300, 900)]
    local = tmp_path / "local"
    (local / "images").mkdir(parents=True)
    for i, size in enumerate(sizes):
        data = image_bytes(size, "gray", "JPEG")
        s3_server.put(f"{s3}/data/images/i{i}.jpg", data)
        (local / "images" / f"i{i}.jpg").write_bytes(data)
    csv = ("image\n" + "".join(f"images/i{i}.jpg\n" for i in range(3)) + "images/none.jpg\n").encode()
    s3_server.put(f"{s3}/data/manifest.csv", csv)
    (local / "manifest.csv").write_bytes(csv)

    found = []
    with throttling(s3_server) as throttle:
        monkeypatch.setenv("AWS_ENDPOINT_URL", throttle.url)
        for manifest in (f"{s3}/data/manifest.csv", str(local / "manifest.csv")):
            cfg = config_in(tmp_path, sim, manifest, str(tmp_path / "out"), prompt={"detail": "high"})
            assert cli.main(["estimate", str(cfg), "--json"]) == 0
            found.append(json.loads(capsys.readouterr().out))
    assert found[0] == found[1]
    bucket = s3.removeprefix("s3://")
    assert {path: throttle.ranges[path] for path in throttle.ranges if "/images/" in path} == {
        f"/{bucket}/data/images/{name}.jpg": "bytes=0-65535" for name in ("i0", "i1", "i2", "none")}
    assert found[0]["rows"] == 3 and found[0]["unreadable_rows"] == 1 and found[0]["input_tokens"]["image"] > 0
    assert answered(sim) == 0


def test_report_and_compact_work_on_a_bucket_directory(
    s3: str, s3_server: S3Server, sim: Simulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = bucket_manifest(s3_server, f"{s3}/data", 12)
    cfg = config_in(tmp_path, sim, manifest, f"{s3}/out")
    for limit in ("3", "4", "100"):
        assert cli.main(["run", str(cfg), "-q", "--limit", limit]) == 0
    assert len([k for k in s3_server.keys(s3) if k.startswith("out/part-")]) == 3
    capsys.readouterr()

    assert cli.main(["compact", f"{s3}/out"]) == 0
    assert capsys.readouterr().out == f"annotate: {s3}/out: 12 rows, 3 parts -> 1, in manifest order\n"

    parts = [k for k in s3_server.keys(s3) if k.startswith("out/part-")]
    assert len(parts) == 1 and "out/_compact.json" not in s3_server.keys(s3)
    out = read_output(f"{s3}/out")
    ids = [row.id for batch in Manifest(InputConfig(manifest=manifest), PromptConfig()).batches() for row in batch]
    assert out["id"].to_list() == ids  # one row per id, in manifest order
    assert cli.main(["report", f"{s3}/out", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_status"] == {"ok": 12}


def test_a_url_whose_extra_is_missing_is_one_line_and_exit_2(tmp_path: Path, sim: Simulator) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "obstore.py").write_text("raise ImportError('No module named obstore')\n")
    cfg = config_in(tmp_path, sim, "s3://somewhere/manifest.csv", str(tmp_path / "out"))
    env = {**os.environ, "PYTHONPATH": str(shim)}
    for command in (["run", str(cfg)], ["estimate", str(cfg)], ["report", "gs://somewhere/out"]):
        done = subprocess.run([sys.executable, "-m", "pipeline", *command], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2, done.stderr
        extra = "gcs" if command[0] == "report" else "s3"
        assert done.stderr.strip().splitlines() == [
            f"annotate: {'gs://somewhere/out' if extra == 'gcs' else 's3://somewhere/manifest.csv'}: this URL needs "
            f"the annotate-pipeline[{extra}] extra: pip install 'annotate-pipeline[{extra}]'"]
    assert answered(sim) == 0


def test_a_store_that_says_slow_down_to_every_first_try_is_read_and_written_all_the_same(
    s3: str, s3_server: S3Server, sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = bucket_manifest(s3_server, f"{s3}/data", 8, extra=["images/missing.png"])
    cfg = config_in(tmp_path, sim, manifest, f"{s3}/out")
    with throttling(s3_server) as throttle:
        monkeypatch.setenv("AWS_ENDPOINT_URL", throttle.url)
        assert cli.main(["run", str(cfg), "-q"]) == 1  # the missing image only
        assert cli.main(["report", f"{s3}/out"]) == 0
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)

    out = read_output(f"{s3}/out")
    assert out.height == 9 and out.filter(pl.col("status") == "ok").height == 8
    assert out.filter(pl.col("status") == "error")["error"].to_list() == [
        f"image: missing object {s3}/data/images/missing.png"]  # a 404 after a 503 is still a 404
    assert throttle.refused.get("GET", 0) >= 9 and throttle.refused.get("PUT", 0) >= 3  # images; parts, _run, lease


def test_an_aws_profile_gives_what_the_environment_does_not_and_environment_keys_replace_its_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "credentials").write_text("[default]\naws_access_key_id = AKIADEFAULT\n"
                                          "aws_secret_access_key = default-secret\n"
                                          "[work]\naws_access_key_id = AKIAWORK\naws_secret_access_key = work-secret\n"
                                          "aws_session_token = work-token\n")
    (tmp_path / "config").write_text("[profile work]\nregion = eu-west-3\nendpoint_url = https://minio.internal:9000\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "work")
    assert profile_options() == {"aws_access_key_id": "AKIAWORK", "aws_secret_access_key": "work-secret",
                                 "aws_session_token": "work-token", "aws_region": "eu-west-3",
                                 "aws_endpoint_url": "https://minio.internal:9000"}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENV")
    monkeypatch.setenv("AWS_REGION", "us-east-2")
    assert profile_options() == {"aws_endpoint_url": "https://minio.internal:9000"}  # no token beside an env key
    monkeypatch.delenv("AWS_PROFILE")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert profile_options() == {"aws_access_key_id": "AKIADEFAULT", "aws_secret_access_key": "default-secret"}


def test_a_config_takes_bucket_urls_and_refuses_other_schemes_in_one_line(tmp_path: Path, sim: Simulator) -> None:
    cfg = config_in(tmp_path, sim, "ftp://host/manifest.csv", "s3://b/out")
    with pytest.raises(ConfigError, match=r"^config: input.manifest: Value error, ftp:// is not a store this reads"):
        load(cfg)
    data = yaml.safe_load(cfg.read_text())
    data["input"]["manifest"] = "gs://b/m.parquet"
    data["storage_options"] = {"aws_secret_access_key": 12345}
    cfg.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as refused:
        load(cfg)
    assert "storage_options.aws_secret_access_key" in str(refused.value) and "12345" not in str(refused.value)
    del data["storage_options"]
    cfg.write_text(yaml.safe_dump(data))
    loaded = load(cfg)
    assert loaded.input.manifest == "gs://b/m.parquet" and loaded.output.dir == "s3://b/out"
