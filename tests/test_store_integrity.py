"""The prepared store never gives wrong numbers silently: damaged files, a manifest that disagrees with its files,
`datasets info` and `datasets verify` (issue 8)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from _one_line import cli_error as _cli_error
from _one_line import raised as _one_line

from cilbench.data import store as store_mod
from cilbench.data.prepare import open_store, prepare
from cilbench.data.store import MANIFEST, STAMP, Store, StoreWriter
from cilbench.errors import CilbenchError

S = 4  # image size of the tiny stores


def _tiny_store(root: Path, source: dict[str, Any] | None = None, domains: bool = False) -> Path:
    """3 classes, train 6 and test 3 images of 4x4, written by StoreWriter as `prepare` does."""
    rng = np.random.default_rng(0)
    writer = StoreWriter(root, root.name, S)
    for split, n in (("train", 6), ("test", 3)):
        images = rng.integers(0, 256, (n, S, S, 3), dtype=np.uint8)
        writer.close_split(split, images, np.arange(n) % 3, np.arange(n) % 2 if domains else None)
    extra = {"domain_names": ["d0", "d1"]} if domains else {}
    writer.finish(["a", "b", "c"], source or {"kind": "offline", "builder": "test"}, **extra)
    return root


def _edit_manifest(root: Path, edit: Callable[[dict], Any]) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    edit(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


def _rewrite_npy(root: Path, split: str, kind: str, arr: np.ndarray) -> None:
    """Replace a label / domain file and make the manifest's size and checksum agree: only its content is wrong."""
    path = root / f"{split}.{kind}.npy"
    np.save(path, arr)

    def edit(m: dict) -> None:
        m["splits"][split]["files"][kind].update(bytes=path.stat().st_size,
                                                 sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    _edit_manifest(root, edit)


def _flip(path: Path, offset: int, n: int = 16) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


# ---------------------------------------------------------------- the issue: damaged images, metadata kept

def _in_place_keep_mtime(path: Path, tmp: Path) -> None:
    st = path.stat()
    _flip(path, path.stat().st_size // 2)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _cp_p_from_damaged_copy(path: Path, tmp: Path) -> None:
    damaged = tmp / "damaged" / path.name
    damaged.parent.mkdir(exist_ok=True)
    shutil.copy2(path, damaged)
    _flip(damaged, damaged.stat().st_size // 2)
    os.utime(damaged, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    shutil.copy2(damaged, path)  # cp -p: the same inode rewritten, mtime carried over


def _rsync_a_from_damaged_copy(path: Path, tmp: Path) -> None:
    st = path.stat()
    partial = path.with_name(f".{path.name}.partial")
    shutil.copyfile(path, partial)
    _flip(partial, st.st_size // 2)
    os.utime(partial, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(partial, path)  # rsync -a: a new file renamed over the old one, mtime carried over


DAMAGE = [_in_place_keep_mtime, _cp_p_from_damaged_copy, _rsync_a_from_damaged_copy]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_damaged_test_images_with_their_mtime_kept_fail_to_open_and_verify(tmp_path, cli, damage):
    cache = tmp_path / "cache"
    root = prepare("synthetic", cache, progress=False).root
    Store.open(root)  # the stamp is in place: the common, fast path
    images = root / "test.images.u8"
    size, mtime = images.stat().st_size, images.stat().st_mtime_ns
    damage(images, tmp_path)
    assert (images.stat().st_size, images.stat().st_mtime_ns) == (size, mtime)  # what the old stamp compared
    with pytest.raises(CilbenchError, match="checksum") as err:
        Store.open(root)
    assert "test.images.u8" in _one_line(err) and "cilbench datasets prepare synthetic --force" in str(err.value)
    with pytest.raises(CilbenchError, match="checksum"):
        open_store("synthetic", cache)  # what a run calls
    r = cli("datasets", "verify", "synthetic", "--cache-dir", cache)
    line = _cli_error(r, 1)
    assert "test.images.u8" in line and "checksum" in line and "--force" in line


@pytest.mark.parametrize("damage", [_in_place_keep_mtime, _rsync_a_from_damaged_copy],
                         ids=lambda f: f.__name__.strip("_"))
def test_the_stamp_alone_catches_a_rewritten_file(tmp_path, monkeypatch, damage):
    # no block sampling: the change must be seen in the stamp itself (ctime, inode), not in the data
    monkeypatch.setattr(store_mod, "_sample_digest", lambda path, size: "not sampled")
    root = prepare("synthetic", tmp_path / "cache", progress=False).root
    Store.open(root)
    time.sleep(0.05)  # past the file system's timestamp granularity: ctime moves on with the write
    damage(root / "train.images.u8", tmp_path)
    with pytest.raises(CilbenchError, match="checksum"):
        Store.open(root)


def test_sampled_blocks_catch_damage_the_metadata_hides(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "SAMPLE_BLOCK", 4096)  # the 1.4 MB file has 360 blocks, 16 are sampled
    root = prepare("synthetic", tmp_path / "cache", progress=False).root
    images = root / "train.images.u8"
    hashed: list[str] = []
    real_sha256 = store_mod.sha256_file
    monkeypatch.setattr(store_mod, "sha256_file", lambda path, *a, **k: hashed.append(path.name) or
                        real_sha256(path, *a, **k))
    Store.open(root)
    assert not [name for name in hashed if name.endswith(".u8")]  # the common case: no image file hashed in full

    data = bytearray(images.read_bytes())
    images.write_bytes(bytes(b ^ 0xFF for b in data))  # every block damaged
    stamp = json.loads((root / STAMP).read_text())  # ... and metadata that looks untouched (bit rot, a bad disk)
    stamp["files"][images.name]["stat"] = store_mod._stat_key(images.stat())
    (root / STAMP).write_text(json.dumps(stamp))
    with pytest.raises(CilbenchError, match="checksum") as err:
        Store.open(root)
    assert "train.images.u8" in _one_line(err)


def test_a_stamp_for_another_checksum_is_not_trusted(tmp_path):
    # the stamp vouches for a file only against the checksum it confirmed, not for whatever the manifest says now
    root = _tiny_store(tmp_path / "cache" / "tiny")
    _edit_manifest(root, lambda m: m["splits"]["test"]["files"]["images"].update(sha256="0" * 64))
    with pytest.raises(CilbenchError, match="checksum"):
        Store.open(root)


# ---------------------------------------------------------------- manifest fields that disagree with the files

def _set(path: str, value: Any) -> Callable[[dict], None]:
    keys = path.split(".")

    def edit(m: dict) -> None:
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value
    return edit


def _delete(path: str) -> Callable[[dict], None]:
    keys = path.split(".")

    def edit(m: dict) -> None:
        for k in keys[:-1]:
            m = m[k]
        del m[keys[-1]]
    return edit


MANIFEST_CASES = {
    "count vs images": (_set("splits.test.count", 4), "splits.test.count"),
    "image_size vs file": (_set("image_size", 2), "image_size"),
    "image_size zero": (_set("image_size", 0), "image_size"),
    "image_size string": (_set("image_size", "4"), "image_size"),
    "image_size float": (_set("image_size", 4.5), "image_size"),
    "image_size bool": (_set("image_size", True), "image_size"),
    "class_names not a list": (_set("class_names", "abc"), "class_names"),
    "class_names not strings": (_set("class_names", [1, 2, 3]), "class_names"),
    "class_names vs num_classes": (_set("class_names", ["a", "b"]), "num_classes"),
    "num_classes vs class_names": (_set("num_classes", 4), "num_classes"),
    "absolute path": (_set("splits.test.files.images.file", "/etc/passwd"), "absolute"),
    "path with ..": (_set("splits.test.files.images.file", "../tiny/test.images.u8"), "leads out"),
    "file name missing": (_delete("splits.test.files.images.file"), "splits.test.files.images.file"),
    "file name empty": (_set("splits.test.files.labels.file", ""), "splits.test.files.labels.file"),
    "file used twice": (_set("splits.test.files.images.file", "train.images.u8"), "is also"),
    "labels entry missing": (_delete("splits.test.files.labels"), "splits.test.files.labels"),
    "split not a dict": (_set("splits.test", ["test.images.u8"]), "splits.test"),
    "splits not a dict": (_set("splits", []), "splits"),
    "files not a dict": (_set("splits.train.files", None), "splits.train.files"),
    "count not an int": (_set("splits.train.count", "6"), "splits.train.count"),
    "negative count": (_set("splits.train.count", -1), "splits.train.count"),
    "bytes not an int": (_set("splits.train.files.labels.bytes", "128"), "splits.train.files.labels.bytes"),
    "sha256 not a digest": (_set("splits.train.files.labels.sha256", None), "splits.train.files.labels.sha256"),
    "source not an object": (_set("source", "hub"), "source"),
    "dataset missing": (_delete("dataset"), "dataset"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_fields_that_disagree_are_one_corrupted_store_line(tmp_path, case):
    edit, field = MANIFEST_CASES[case]
    root = _tiny_store(tmp_path / "cache" / "tiny")
    _edit_manifest(root, edit)
    with pytest.raises(CilbenchError) as err:
        Store.open(root)
    line = _one_line(err)
    assert line.startswith(f"corrupted store manifest {root / MANIFEST}: ") and field in line, line
    assert "cilbench datasets prepare tiny --force" in line
    assert Store.inspect(root).state == "corrupted"


def test_a_symlink_out_of_the_store_is_refused(tmp_path):
    root = _tiny_store(tmp_path / "cache" / "tiny")
    outside = tmp_path / "elsewhere.u8"
    shutil.copy(root / "test.images.u8", outside)  # right size and content: only where it lives is wrong
    (root / "link.u8").symlink_to(outside)
    _edit_manifest(root, _set("splits.test.files.images.file", "link.u8"))
    with pytest.raises(CilbenchError, match="resolves outside the store") as err:
        Store.open(root)
    _one_line(err)


@pytest.mark.parametrize("text,message", [
    ("[1, 2]", "not a JSON object"),
    ('"a string"', "not a JSON object"),
    ("{not json", "corrupted store manifest"),
    ("\xff\xfe", "corrupted store manifest"),
])
def test_a_manifest_that_is_not_an_object(tmp_path, text, message):
    root = _tiny_store(tmp_path / "cache" / "tiny")
    (root / MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(CilbenchError, match=message) as err:
        Store.open(root)
    assert "--force" in _one_line(err)


@pytest.mark.parametrize("split,kind,values,message", [
    ("test", "labels", [0, 1, 3], "label 3, outside [0, 3)"),
    ("train", "labels", [0, 1, 2, -1, 1, 2], "label -1"),
    ("test", "labels", [0, 1], "splits.test.count is 3 but test.labels.npy holds labels of shape [2]"),
    ("test", "labels", [[0, 1, 2]], "holds labels of shape [1, 3]"),
    ("train", "domains", [0, 1, 0, 1, 0, 2], "domain 2, outside [0, 2)"),
])
def test_labels_and_domains_must_fit_the_manifest(tmp_path, split, kind, values, message):
    root = _tiny_store(tmp_path / "cache" / "tiny", domains=True)
    _rewrite_npy(root, split, kind, np.array(values, dtype=np.int64))  # checksums agree: only the values are wrong
    with pytest.raises(CilbenchError) as err:
        Store.open(root)
    assert message in _one_line(err) and "--force" in str(err.value)


def test_labels_of_a_store_opened_without_verify_are_checked_when_read(tmp_path):
    root = _tiny_store(tmp_path / "cache" / "tiny")
    _rewrite_npy(root, "test", "labels", np.array([0, 5, 1], dtype=np.int64))
    store = Store.open(root, verify=False)
    with pytest.raises(CilbenchError, match="label 5"):
        store.split("test")


def test_a_store_from_a_local_folder_names_its_source_in_the_rebuild_hint(tmp_path):
    root = _tiny_store(tmp_path / "cache" / "tiny", source={"kind": "imagefolder", "path": "/data/tiny"})
    (root / "train.images.u8").write_bytes(b"")
    with pytest.raises(CilbenchError) as err:
        Store.open(root)
    assert "cilbench datasets prepare tiny --source /data/tiny --force" in _one_line(err)


def test_a_good_store_opens_and_reads_as_written(tmp_path):
    root = _tiny_store(tmp_path / "cache" / "tiny", domains=True)
    store = Store.open(root)
    split = store.split("train")
    assert split.images.shape == (6, S, S, 3) and split.labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert split.domains.tolist() == [0, 1, 0, 1, 0, 1] and split.labels.dtype == np.int64
    assert Store.inspect(root).state == "prepared"


# ---------------------------------------------------------------- datasets info and datasets verify

def _info(cli, cache: Path, name: str = "digits") -> dict:
    r = cli("datasets", "info", name, "--cache-dir", cache, "--json")
    assert r.code == 0 and "Traceback" not in r.err + r.out, r.err
    return json.loads(r.out)


def test_datasets_info_reports_the_state_of_the_files(cli, tmp_path):
    cache = tmp_path / "cache"
    info = _info(cli, cache)
    assert info["prepared"] is False and info["state"] == "not prepared"
    assert cli("datasets", "prepare", "digits", "--cache-dir", cache).code == 0
    info = _info(cli, cache)
    assert info["prepared"] is True and info["state"] == "prepared" and info["store"]["counts"]["test"] == 359
    root = cache / "digits"

    (root / "test.images.u8").rename(tmp_path / "aside.u8")
    info = _info(cli, cache)
    assert info["prepared"] is False and info["state"] == "incomplete: test.images.u8 is missing"
    assert info["fix"] == "cilbench datasets prepare digits --force"
    r = cli("datasets", "info", "digits", "--cache-dir", cache)  # the human form says the same
    assert r.code == 0 and "state: incomplete: test.images.u8 is missing" in r.out.replace("\n", " ")
    (tmp_path / "aside.u8").rename(root / "test.images.u8")
    assert _info(cli, cache)["state"] == "prepared"

    with open(root / "train.images.u8", "r+b") as f:
        f.truncate(1000)
    info = _info(cli, cache)
    assert info["state"].startswith("corrupted: train.images.u8 has 1000 bytes") and info["prepared"] is False


@pytest.mark.parametrize("text", ["{not json", "[]", '{"schema": 1, "splits": {"train": 3}}', ""])
def test_datasets_info_on_a_garbage_manifest_is_no_traceback(cli, tmp_path, text):
    cache = tmp_path / "cache"
    _tiny_store(cache / "digits")
    (cache / "digits" / MANIFEST).write_text(text)
    for args in (["--json"], []):
        r = cli("datasets", "info", "digits", "--cache-dir", cache, *args)
        assert r.code == 0 and "Traceback" not in r.err + r.out, r.err
    info = _info(cli, cache)
    assert info["prepared"] is False and info["state"].startswith("corrupted: manifest")


def test_datasets_verify(cli, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    line = _cli_error(cli("datasets", "verify", "digits", "--cache-dir", cache), 2)
    assert "not prepared" in line and "cilbench datasets prepare digits" in line
    root = prepare("digits", cache, progress=False).root
    r = cli("datasets", "verify", "digits", "--cache-dir", cache)
    assert r.code == 0, r.err
    assert r.out.strip() == "verified digits: 4 files, 0.4 MB, checksums match"

    # damage that every open misses (metadata and sampled blocks unchanged): verify hashes every byte
    monkeypatch.setattr(store_mod, "_sample_digest", lambda path, size: "not sampled")
    (root / STAMP).unlink()
    Store.open(root)  # stamped with the patched sample
    images = root / "train.images.u8"
    _flip(images, 5000)
    stamp = json.loads((root / STAMP).read_text())
    stamp["files"][images.name]["stat"] = store_mod._stat_key(images.stat())
    (root / STAMP).write_text(json.dumps(stamp))
    Store.open(root)  # passes: what a cheap open cannot see
    line = _cli_error(cli("datasets", "verify", "digits", "--cache-dir", cache), 1)
    assert line.startswith("error: corrupted store: ") and "train.images.u8 does not match the checksum" in line
    assert "cilbench datasets prepare digits --force" in line


def test_datasets_verify_names_the_source_folder_and_refreshes_the_stamp(cli, tmp_path):
    cache = tmp_path / "cache"
    root = _tiny_store(cache / "cifar100", source={"kind": "imagefolder", "path": "/data/c100"})
    (root / STAMP).unlink()
    r = cli("datasets", "verify", "cifar100", "--cache-dir", cache)
    assert r.code == 0 and r.out.startswith("verified cifar100: 4 files"), r.err
    stamp = json.loads((root / STAMP).read_text())
    assert sorted(stamp["files"]) == ["test.images.u8", "train.images.u8"]
    _flip(root / "test.labels.npy", 130, 4)
    line = _cli_error(cli("datasets", "verify", "cifar100", "--cache-dir", cache), 1)
    assert "test.labels.npy" in line and "cilbench datasets prepare cifar100 --source /data/c100 --force" in line
