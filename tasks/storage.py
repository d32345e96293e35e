"""Checkpoint stores: a local folder (the embedded default) and S3, with one set of semantics.

A checkpoint lives under `<store root>/<key>/` as its files plus `manifest.json` (see minitron/manifest.py).
Writers upload every file first and the manifest last, after deleting any older manifest at that key, so a reader
that finds a manifest finds every file it lists. Readers fetch the manifest, validate its paths before any
download, stage the files inside the destination folder, verify size and sha256, and only then move them into
place: a failed download leaves nothing behind.

Both stores implement seven raw operations (`_upload`, `_download`, `_write`, `_read`, `_delete`, `_stat`, `_sha256`);
everything else is shared, which is what keeps their behaviour identical.

`verify` checks a checkpoint where it lies, before a cached stage result that points at it is trusted: the manifest
must be there and every file must have its size, and its content must match: sha256 on a folder (local reads), the
ETag S3 computed at upload (recorded in the manifest) on S3, or sha256 everywhere (`level="sha256"` downloads).
"""

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from minitron import manifest as mf
from minitron.errors import UserError


def _check_key(key: str) -> str:
    """A store key is a relative posix path without `.`/`..` parts; '' is the store root."""
    key = key.strip("/")
    if "\\" in key or any(p in (".", "..") for p in PurePosixPath(key).parts):
        raise UserError(f"store key {key!r} must be a relative path without '..'")
    return key


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


class Store:
    """Shared semantics over a root URI; subclasses provide the raw byte operations."""

    root: str  # URI of the store root, without trailing slash

    def uri(self, key: str = "") -> str:
        return _join(self.root, _check_key(key)) if key else self.root

    def key_of(self, uri_or_key: str) -> str:
        """Accept a key relative to the root or a full URI under it (as returned by put_folder)."""
        if "://" not in uri_or_key and not os.path.isabs(uri_or_key):
            return _check_key(uri_or_key)
        uri = _normalise_uri(uri_or_key)
        if uri == self.root:
            return ""
        if not uri.startswith(self.root + "/"):
            raise UserError(f"{uri_or_key} is not inside the checkpoint store {self.root}")
        return _check_key(uri[len(self.root) + 1 :])

    # -- checkpoints -------------------------------------------------------------------------------------------
    def put_folder(self, local_dir: str | Path, key: str) -> str:
        """Upload every file of local_dir to <key>/, manifest last. Returns the checkpoint URI."""
        key = _check_key(key)
        local_dir = Path(local_dir)
        manifest = mf.build_manifest(local_dir)
        # An older manifest would vouch for files we are about to overwrite: drop it before the first upload.
        self._delete(_join(key, mf.MANIFEST_NAME))
        for entry in manifest["files"]:
            self._upload(local_dir / entry["path"], _join(key, entry["path"]))
            etag = self._stat(_join(key, entry["path"]))[1]
            if etag:  # the store's own content hash: lets `verify` check content without downloading
                entry["etag"] = etag
        self._write(_join(key, mf.MANIFEST_NAME), mf.dumps(manifest).encode())
        return self.uri(key)

    def verify(self, uri_or_key: str, level: str = "auto") -> None:
        """Check a stored checkpoint in place (see the module doc); a one-line UserError names what is wrong.
        level: auto (sha256 on a folder, ETag on S3), sha256 (everywhere: S3 downloads every byte), size."""
        key = self.key_of(uri_or_key)
        where = self.uri(key)
        for entry in self.get_manifest(key)["files"]:
            stat = self._stat(_join(key, entry["path"]))
            if stat is None:
                raise UserError(f"{where}: {entry['path']} is missing")
            size, etag = stat
            if size != entry["size"]:
                raise UserError(f"{where}: {entry['path']} has {size} bytes, its manifest says {entry['size']}")
            if level == "sha256" or (level == "auto" and etag is None):
                if self._sha256(_join(key, entry["path"])) != entry["sha256"]:
                    raise UserError(f"{where}: {entry['path']} does not match its sha256 in the manifest")
            elif level == "auto" and entry.get("etag") and etag != entry["etag"]:
                raise UserError(f"{where}: {entry['path']} was changed after upload (its ETag differs)")

    def get_manifest(self, uri_or_key: str) -> dict:
        key = self.key_of(uri_or_key)
        raw = self._read(_join(key, mf.MANIFEST_NAME))
        if raw is None:
            raise UserError(f"no complete checkpoint at {self.uri(key)} (manifest.json missing)")
        try:
            manifest = json.loads(raw)
        except ValueError as e:
            raise UserError(f"{self.uri(key)}/manifest.json is not valid JSON: {e}") from None
        mf.check_manifest_paths(manifest)
        return manifest

    def get_folder(self, uri_or_key: str, dest: str | Path) -> Path:
        """Download a checkpoint into dest (created if needed) and verify it. Returns dest."""
        key = self.key_of(uri_or_key)
        manifest = self.get_manifest(key)  # validated before any byte of a file is fetched
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        stage = dest / f".download-{uuid.uuid4().hex[:8]}"
        try:
            for entry in manifest["files"]:
                local = mf.safe_join(stage, entry["path"])
                local.parent.mkdir(parents=True, exist_ok=True)
                self._download(_join(key, entry["path"]), local)
                try:
                    mf.verify_file(local, entry)
                except UserError as err:
                    raise UserError(f"checkpoint {self.uri(key)}: {err}") from None
            for entry in manifest["files"]:  # all verified: move into place
                target = mf.safe_join(dest, entry["path"])
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(stage / entry["path"], target)
            _atomic_write(dest / mf.MANIFEST_NAME, mf.dumps(manifest).encode())
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return dest

    def exists(self, uri_or_key: str) -> bool:
        """True when a complete checkpoint (its manifest) is at that key."""
        return self._read(_join(self.key_of(uri_or_key), mf.MANIFEST_NAME)) is not None

    # -- raw operations ----------------------------------------------------------------------------------------
    def _upload(self, path: Path, key: str) -> None:
        raise NotImplementedError

    def _download(self, key: str, path: Path) -> None:
        raise NotImplementedError

    def _write(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def _read(self, key: str) -> bytes | None:
        raise NotImplementedError

    def _delete(self, key: str) -> None:
        raise NotImplementedError

    def _stat(self, key: str) -> tuple[int, str | None] | None:
        """(size, ETag or None) of a stored file, None when it is missing."""
        raise NotImplementedError

    def _sha256(self, key: str) -> str:
        raise NotImplementedError

    def check(self) -> None:
        raise NotImplementedError


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class LocalStore(Store):
    """A plain folder; writes go through a temp file + rename so no reader sees half a file."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser().resolve()
        self.root = self.folder.as_uri()

    def _path(self, key: str) -> Path:
        return mf.safe_join(self.folder, key) if key else self.folder

    def _upload(self, path: Path, key: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(fd)
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    def _download(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise UserError(f"checkpoint file {self.uri(key)} is missing")
        shutil.copyfile(source, path)

    def _write(self, key: str, data: bytes) -> None:
        _atomic_write(self._path(key), data)

    def _read(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def _stat(self, key: str) -> tuple[int, str | None] | None:
        path = self._path(key)
        return (path.stat().st_size, None) if path.is_file() else None

    def _sha256(self, key: str) -> str:
        return mf.sha256_file(self._path(key))

    def check(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.folder).close()
        except OSError as e:
            raise UserError(f"checkpoint folder {self.folder} is not writable: {e.strerror}") from None


# -- S3 ------------------------------------------------------------------------------------------------------------
MULTIPART_THRESHOLD = 64 << 20  # files above this are uploaded in parts ...
MULTIPART_CHUNK = 64 << 20  # ... of this size: 10k-part limit → up to 640 GB per file
# botocore attempts per request (standard mode: exponential backoff with jitter, ≤20 s apart); AWS_MAX_ATTEMPTS, the
# variable the AWS tools read, changes it
MAX_ATTEMPTS = int(os.environ.get("AWS_MAX_ATTEMPTS", 8))


def s3_endpoint() -> str | None:
    """The endpoint of an S3-compatible store, from the environment variables that boto3 itself reads."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client(endpoint_url: str | None = None, *, max_attempts: int = MAX_ATTEMPTS, connect_timeout: float = 10):
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or s3_endpoint()
    extra = {}
    if endpoint_url:
        # boto3 >= 1.36 adds CRC checksums that many S3-compatible stores reject; only send them when required.
        extra = {"request_checksum_calculation": "when_required", "response_checksum_validation": "when_required"}
    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        s3={"addressing_style": "path"},  # virtual-host style needs DNS per bucket, which local stores lack
        connect_timeout=connect_timeout,
        read_timeout=60,
        **extra,
    )
    # A fresh session reads the credentials in the environment now (boto3's default session caches the first ones).
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


class S3Store(Store):
    """s3://bucket/prefix on AWS or any S3-compatible endpoint."""

    def __init__(self, uri: str, *, endpoint_url: str | None = None, multipart_threshold: int = MULTIPART_THRESHOLD,
                 multipart_chunksize: int = MULTIPART_CHUNK, max_attempts: int = MAX_ATTEMPTS):
        from boto3.s3.transfer import TransferConfig

        parsed = urlparse(uri)
        self.bucket, self.prefix = parsed.netloc, _check_key(parsed.path)
        if not self.bucket:
            raise UserError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
        self.root = f"s3://{_join(self.bucket, self.prefix)}"
        self.endpoint_url = endpoint_url or s3_endpoint()
        self.max_attempts = max_attempts
        self.client = s3_client(self.endpoint_url, max_attempts=max_attempts)
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize,
                                       max_concurrency=4, use_threads=True)

    def _key(self, key: str) -> str:
        full = _join(self.prefix, key)
        if self.prefix and not full.startswith(self.prefix + "/"):
            raise UserError(f"key {key!r} is outside the store prefix {self.prefix!r}")
        return full

    def _upload(self, path: Path, key: str) -> None:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:  # botocore already retried each request (MAX_ATTEMPTS, exponential backoff): the store is down
            self.client.upload_file(str(path), self.bucket, self._key(key), Config=self.transfer)
        except (S3UploadFailedError, BotoCoreError, ClientError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise UserError(f"upload to {self.uri(key)} at {self.endpoint_url or 'AWS S3'} failed "
                            f"after {self.max_attempts} attempts ({first}): bring the store back (`minitron stack up` "
                            "restarts it) and run the same command again; the trained model stays in "
                            f"{path.parent} and is published without retraining") from None

    def _download(self, key: str, path: Path) -> None:
        self.client.download_file(self.bucket, self._key(key), str(path), Config=self.transfer)

    def _write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def _read(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def _delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def _stat(self, key: str) -> tuple[int, str | None] | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as err:
            if str(err.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return head["ContentLength"], head.get("ETag")

    def _sha256(self, key: str) -> str:
        import hashlib

        h = hashlib.sha256()
        for chunk in self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].iter_chunks(1 << 20):
            h.update(chunk)
        return h.hexdigest()

    def check(self) -> None:
        """Fail in seconds, with one line, on an unreachable endpoint, a missing bucket or bad credentials."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        where = f"s3://{self.bucket}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")
        probe = s3_client(self.endpoint_url, max_attempts=2, connect_timeout=3)
        try:
            probe.head_bucket(Bucket=self.bucket)
        except NoCredentialsError:
            raise UserError(f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
        except EndpointConnectionError:
            raise UserError(f"cannot reach the S3 endpoint for {where}: is it running? (AWS_ENDPOINT_URL_S3)") from None
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket"):
                raise UserError(f"bucket {self.bucket!r} does not exist ({where}): create it or fix the URI") from None
            if code in ("403", "401", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
                raise UserError(f"access to {where} denied: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None
            raise UserError(f"S3 check of {where} failed: {code or e}") from None
        except BotoCoreError as e:
            raise UserError(f"S3 check of {where} failed: {e}") from None


# -- entry points ------------------------------------------------------------------------------------------------
def _normalise_uri(uri: str) -> str:
    """file:// URIs and plain paths → absolute file:// URI; s3:// unchanged (minus trailing slash)."""
    if uri.startswith("s3://"):
        return uri.rstrip("/")
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path)).resolve().as_uri()
    if "://" in uri:
        raise UserError(f"unsupported checkpoint store {uri!r}: use a folder, file:// or s3://bucket/prefix")
    return Path(uri).expanduser().resolve().as_uri()


def open_store(uri: str | Path, **s3_options) -> Store:
    """A store for a folder path, file:// URI or s3://bucket/prefix (s3_options go to S3Store)."""
    uri = _normalise_uri(str(uri))
    if uri.startswith("s3://"):
        return S3Store(uri, **s3_options)
    return LocalStore(unquote(urlparse(uri).path))


def check_store(uri: str | Path, **s3_options) -> Store:
    """Open a store and check that it is reachable and writable enough to start; one-line UserError otherwise."""
    from_env = str(uri).startswith("s3://")
    try:
        store = open_store(uri, **s3_options)
    except Exception as e:  # boto3 resolves credentials when the client is made: half-set ones fail here
        if from_env and type(e).__module__.startswith("botocore"):
            raise UserError(f"S3 credentials for {uri} are incomplete or invalid: {e}") from None
        raise
    store.check()
    return store
