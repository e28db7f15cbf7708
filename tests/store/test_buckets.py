"""Manifests, images and output in a bucket, against a real S3 API server on 127.0.0.1 (moto's)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from pipeline import cli
from pipeline.simulator import Simulator

from ..conftest import image_bytes, write_config
from ..runs import answered
from ..s3_server import ACCESS_KEY, SECRET_KEY, S3Server


def bucket_manifest(server: S3Server, folder: str, n: int, extra: list[str] = ()) -> str:  # type: ignore[assignment]
    """n images and a CSV naming them relatively (and `extra` refs as written), in the bucket; its URL."""
    names = []
    for i in range(n):
        server.put(f"{folder}/images/img{i:03d}.png", image_bytes((64, 48), (i * 9 % 256, 40, 200)))
        names.append(f"images/img{i:03d}.png")
    csv = "image\n" + "\n".join([*names, *extra]) + "\n"
    server.put(f"{folder}/manifest.csv", csv.encode())
    return f"{folder}/manifest.csv"


def config_in(tmp_path: Path, sim: Simulator, manifest: str, out: str, **sections: object) -> Path:
    return write_config(tmp_path, sim.url, manifest, output={"dir": out}, **sections)  # type: ignore[arg-type]


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
    assert "_lock.json" not in s3_server.keys(s3)  # the lease is let go at the end

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
