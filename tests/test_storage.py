"""Checkpoint stores against a real moto S3 server over HTTP and a real folder: same tests, same semantics."""

import hashlib
import json
import uuid

import pytest
from services import FlakyProxy

from minitron.errors import UserError
from tasks import storage


def make_checkpoint(folder, big: int = 0):
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 1024)  # 256 KiB
    (folder / "config.json").write_text('{"hidden_size": 64}')
    (folder / "tokenizer" / "tokenizer.json").write_text('{"vocab": {}}')
    if big:
        (folder / "big.bin").write_bytes(uuid.uuid4().bytes * (big // 16))
    return folder


def files_of(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return storage.open_store(tmp_path / "store")
    s3 = request.getfixturevalue("s3_env")
    return storage.open_store(f"s3://{s3.checkpoint_bucket}/t-{uuid.uuid4().hex[:8]}")


def test_round_trip_verifies_every_file(store, tmp_path):
    src = make_checkpoint(tmp_path / "src")
    uri = store.put_folder(src, "run1/importance")
    assert uri == store.root + "/run1/importance" and store.exists(uri) and store.exists("run1/importance")
    dest = store.get_folder(uri, tmp_path / "dest")
    got = files_of(dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    assert {k: v for k, v in got.items() if k != "manifest.json"} == files_of(src)
    assert {f["path"]: f["sha256"] for f in manifest["files"]} == files_of(src)
    assert not list(dest.glob(".download-*"))
    assert not store.exists("run1/other")


def _overwrite(store, key: str, data: bytes) -> None:
    """Change a stored file behind the manifest's back (what a bit flip or a careless copy does)."""
    store._write(key, data)


@pytest.mark.parametrize("level", ["auto", "sha256"])
def test_verify_checks_manifest_sizes_and_content_in_place(store, tmp_path, level):
    src = make_checkpoint(tmp_path / "src")
    uri = store.put_folder(src, "v/ck")
    store.verify(uri, level)  # intact
    flipped = bytearray((src / "model.safetensors").read_bytes())
    flipped[1000] ^= 0x01  # one bit, same size: only a content check sees it
    _overwrite(store, "v/ck/model.safetensors", bytes(flipped))
    with pytest.raises(UserError, match=r"v/ck: model.safetensors (does not match its sha256|was changed after "
                                        r"upload)"):
        store.verify(uri, level)
    store.verify(uri, "size")  # sizes alone cannot tell
    _overwrite(store, "v/ck/config.json", b"{}")
    with pytest.raises(UserError, match="config.json has 2 bytes, its manifest says 19"):
        store.verify(uri, level)
    store._delete("v/ck/config.json")
    with pytest.raises(UserError, match="config.json is missing"):
        store.verify(uri, level)
    store._delete("v/ck/manifest.json")
    with pytest.raises(UserError, match="manifest.json missing"):
        store.verify(uri, level)


def test_missing_checkpoint_is_a_user_error(store, tmp_path):
    with pytest.raises(UserError, match="manifest.json missing"):
        store.get_folder("nope", tmp_path / "dest")


def test_uri_outside_store_rejected(store, tmp_path):
    with pytest.raises(UserError):
        store.get_folder("s3://another-bucket/x" if store.root.startswith("file") else "/elsewhere/x", tmp_path / "d")
    with pytest.raises(UserError):
        store.put_folder(make_checkpoint(tmp_path / "src"), "../up")


def tamper(store, key, change):
    """Rewrite a stored manifest the way an attacker (or a bit flip) would."""
    manifest = store.get_manifest(key)
    change(manifest)
    store._write(f"{key}/manifest.json", json.dumps(manifest).encode())


@pytest.mark.parametrize("attack", ["dotdot", "absolute", "sha", "size"])
def test_tampered_manifest_leaves_nothing_behind(store, tmp_path, attack):
    src = make_checkpoint(tmp_path / "src")
    store.put_folder(src, "ck")
    changes = {
        "dotdot": lambda m: m["files"][0].update(path="../x"),
        "absolute": lambda m: m["files"][0].update(path="/etc/x"),
        "sha": lambda m: m["files"][-1].update(sha256=hashlib.sha256(b"other").hexdigest()),
        "size": lambda m: m["files"][-1].update(size=m["files"][-1]["size"] + 1),
    }
    tamper(store, "ck", changes[attack])
    dest = tmp_path / "work" / "dest"
    with pytest.raises(UserError):
        store.get_folder("ck", dest)
    assert not (tmp_path / "work" / "x").exists() and not (tmp_path / "x").exists()
    assert list((tmp_path / "work").rglob("*")) in ([], [dest])  # no file anywhere, at most the empty dest


def test_rewrite_drops_old_manifest_first(store, tmp_path):
    """While a checkpoint is rewritten, its old manifest must not vouch for the new, half-written files."""
    src = make_checkpoint(tmp_path / "src")
    store.put_folder(src, "ck")
    seen = []
    upload = store._upload

    def spy(path, key):
        seen.append(store.exists("ck"))
        upload(path, key)

    store._upload = spy
    (src / "config.json").write_text('{"hidden_size": 32}')
    store.put_folder(src, "ck")
    assert seen and not any(seen)
    assert json.loads((store.get_folder("ck", tmp_path / "d") / "config.json").read_text()) == {"hidden_size": 32}


def test_multipart_upload_and_download(s3_env, tmp_path):
    store = storage.open_store(f"s3://{s3_env.checkpoint_bucket}/mp", multipart_threshold=5 << 20,
                               multipart_chunksize=5 << 20)
    src = make_checkpoint(tmp_path / "src", big=11 << 20)  # 3 parts
    store.put_folder(src, "ck")
    head = s3_env.client().head_object(Bucket=s3_env.checkpoint_bucket, Key="mp/ck/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # S3 marks multipart objects with "-<parts>"
    assert files_of(store.get_folder("ck", tmp_path / "d")) == {**files_of(src), "manifest.json": files_of(
        tmp_path / "d")["manifest.json"]}


def test_open_store_forms(tmp_path):
    assert isinstance(storage.open_store(str(tmp_path)), storage.LocalStore)
    assert storage.open_store(tmp_path.as_uri()).root == tmp_path.resolve().as_uri()
    with pytest.raises(UserError, match="unsupported"):
        storage.open_store("gs://bucket/x")
    with pytest.raises(UserError, match="bucket"):
        storage.open_store("s3:///x")


# -- faults ----------------------------------------------------------------------------------------------------------
def proxied_store(s3, proxy, prefix, **kw):
    return storage.S3Store(f"s3://{s3.checkpoint_bucket}/{prefix}", endpoint_url=proxy.url, **kw)


def manifest_present(s3, key) -> bool:
    """Looked up directly on moto, not through the failing proxy."""
    objects = s3.client().list_objects_v2(Bucket=s3.checkpoint_bucket, Prefix=key).get("Contents", [])
    return any(o["Key"] == f"{key}/manifest.json" for o in objects)


def test_upload_survives_an_outage(s3_env, tmp_path):
    proxy = FlakyProxy(int(s3_env.url.rsplit(":", 1)[1]))
    try:
        prefix = f"flaky-{uuid.uuid4().hex[:6]}"
        store = proxied_store(s3_env, proxy, prefix)
        src = make_checkpoint(tmp_path / "src")
        during = []
        # Cut the connection in the middle of the 256 KiB weights file and stay down for 1.5 s.
        proxy.fail_after(100_000, 1.5, on_outage=lambda: during.append(manifest_present(s3_env, f"{prefix}/ck")))
        try:
            uri = store.put_folder(src, "ck")
        except Exception as e:
            raise AssertionError(f"upload failed after the outage; proxy saw {proxy.upstream_errors}") from e
        assert proxy.outages == 1 and during == [False]
        dest = storage.open_store(f"s3://{s3_env.checkpoint_bucket}/{prefix}").get_folder(uri, tmp_path / "d")
        assert {k: v for k, v in files_of(dest).items() if k != "manifest.json"} == files_of(src)
    finally:
        proxy.close()


def test_failed_upload_never_leaves_a_manifest(s3_env, tmp_path):
    proxy = FlakyProxy(int(s3_env.url.rsplit(":", 1)[1]))
    try:
        prefix = f"dead-{uuid.uuid4().hex[:6]}"
        src = make_checkpoint(tmp_path / "src")
        storage.open_store(f"s3://{s3_env.checkpoint_bucket}/{prefix}").put_folder(src, "ck")  # an older version
        store = proxied_store(s3_env, proxy, prefix, max_attempts=2)
        (src / "model.safetensors").write_bytes(b"new weights" * 50_000)
        proxy.fail_after(200_000, float("inf"))  # the endpoint dies for good mid-upload
        with pytest.raises(UserError, match=rf"upload to s3://.*/ck/model.safetensors at {proxy.url} failed "
                           r"after 2 attempts .*run the same command again") as err:
            store.put_folder(src, "ck")
        assert "\n" not in str(err.value)
        assert proxy.refused >= 1  # the client did retry
        assert not manifest_present(s3_env, f"{prefix}/ck")  # the old manifest is gone, no new one was written
    finally:
        proxy.close()


# -- check_store -------------------------------------------------------------------------------------------------
def test_check_store_ok(s3_env, tmp_path):
    storage.check_store(f"s3://{s3_env.checkpoint_bucket}/x")
    storage.check_store(tmp_path / "new" / "folder")
    assert (tmp_path / "new" / "folder").is_dir()


def test_check_store_missing_bucket(s3_env):
    with pytest.raises(UserError, match="does not exist"):
        storage.check_store("s3://no-such-bucket-here/x")


def test_check_store_unreachable_endpoint():
    port = storage_free_port()
    with pytest.raises(UserError, match="cannot reach"):
        storage.check_store("s3://b/x", endpoint_url=f"http://127.0.0.1:{port}")


def storage_free_port():
    from infra.stack import free_port

    return free_port()


def test_check_store_unwritable_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not writable"):
        storage.check_store(tmp_path / "file" / "sub")


def test_check_store_wrong_credentials(tmp_path, monkeypatch):
    """moto with IAM authentication on (INITIAL_NO_AUTH_ACTION_COUNT): a made-up key is refused, a real one works."""
    import boto3

    from infra import stack

    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "4")  # admin calls below, before auth kicks in
    proc = stack.start_s3(tmp_path, "127.0.0.1", stack.free_port())
    try:
        stack.wait_healthy([proc], timeout=60)  # the health check is not an AWS action
        iam = boto3.client("iam", endpoint_url=proc.url, region_name="us-east-1")
        iam.create_user(UserName="ci")
        iam.put_user_policy(UserName="ci", PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="ci")["AccessKey"]
        storage.s3_client(proc.url).create_bucket(Bucket="authbucket")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong" + key["SecretAccessKey"][5:])
        with pytest.raises(UserError, match="denied"):
            storage.check_store("s3://authbucket/x", endpoint_url=proc.url)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        storage.check_store("s3://authbucket/x", endpoint_url=proc.url)
    finally:
        stack.stop(proc)

