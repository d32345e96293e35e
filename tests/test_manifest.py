import hashlib
import json

import pytest

from minitron import manifest as mf
from minitron.errors import UserError


def make_folder(root):
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(b"\x00\x01" * 1000)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "tok.json").write_text("hello")
    return root


def test_build_manifest_lists_every_file_with_reference_sha(tmp_path):
    folder = make_folder(tmp_path / "ckpt")
    (folder / "manifest.json").write_text("{}")  # an old manifest is not part of the new one
    m = mf.build_manifest(folder)
    assert m["format"] == 1 and m["created"].endswith("+00:00")
    assert [f["path"] for f in m["files"]] == ["config.json", "model.safetensors", "sub/tok.json"]
    tok = m["files"][2]
    assert tok == {"path": "sub/tok.json", "size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}
    assert m["files"][1]["size"] == 2000
    assert mf.check_manifest_paths(json.loads(mf.dumps(m))) == m["files"]


@pytest.mark.parametrize("path", ["../x", "/etc/x", "a/../../x", "a\\b", "", ".", "a//b", "./a", "C:evil",
                                  "manifest.json"])
def test_unsafe_paths_rejected(path):
    entry = {"path": path, "size": 1, "sha256": "0" * 64}
    with pytest.raises(UserError):
        mf.check_manifest_paths({"format": 1, "files": [entry]})


@pytest.mark.parametrize("bad", [{"format": 2, "files": []}, {"format": 1}, [],
                                 {"format": 1, "files": [{"path": "a", "size": -1, "sha256": "0" * 64}]},
                                 {"format": 1, "files": [{"path": "a", "size": 1, "sha256": "xyz"}]},
                                 {"format": 1, "files": [{"path": "a", "size": 1}]}])
def test_malformed_manifest_rejected(bad):
    with pytest.raises(UserError):
        mf.check_manifest_paths(bad)


def test_duplicate_paths_rejected():
    entry = {"path": "a", "size": 1, "sha256": "0" * 64}
    with pytest.raises(UserError, match="twice"):
        mf.check_manifest_paths({"format": 1, "files": [entry, dict(entry)]})


def test_verify_file_deletes_bad_files(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(b"abc")
    good = {"path": "w.bin", "size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}
    mf.verify_file(path, good)  # passes, file kept
    assert path.exists()
    with pytest.raises(UserError, match="sha256"):
        mf.verify_file(path, {**good, "sha256": hashlib.sha256(b"abd").hexdigest()})
    assert not path.exists()
    path.write_bytes(b"abc")
    with pytest.raises(UserError, match="size"):
        mf.verify_file(path, {**good, "size": 4})
    assert not path.exists()


def test_safe_join_refuses_symlink_escape(tmp_path):
    (tmp_path / "dest").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "dest" / "link").symlink_to(tmp_path / "outside")
    assert mf.safe_join(tmp_path / "dest", "a/b") == (tmp_path / "dest" / "a" / "b").resolve()
    with pytest.raises(UserError):
        mf.safe_join(tmp_path / "dest", "link/x")
