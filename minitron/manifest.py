"""Integrity manifest of a checkpoint folder.

A checkpoint is a folder of files (safetensors shards, config, tokenizer, ...) plus `manifest.json`, which lists
every file with its size and sha256. Stores write the manifest last, so its presence means "complete", and readers
check every file against it. Paths in a manifest come from a remote store and are untrusted: `check_manifest_paths`
rejects anything that could land outside the destination folder before a single byte is downloaded.

Pure python on purpose: the GPU image, which has no boto3, verifies checkpoints with it too.
"""

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

from minitron.errors import UserError

MANIFEST_NAME = "manifest.json"
FORMAT = 1  # bumped on any incompatible change of the layout below
_CHUNK = 1 << 20  # hashing read size: 1 MiB keeps memory flat on multi-GB shards


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(folder: str | Path) -> dict:
    """Manifest over every regular file under `folder` (recursively, sorted), except an old manifest.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"checkpoint folder {folder} does not exist")
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_NAME:
            continue
        files.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return {"format": FORMAT, "files": files, "created": datetime.now(UTC).isoformat(timespec="seconds")}


def check_manifest_paths(manifest: dict) -> list[dict]:
    """Validate a manifest read from a store; returns its file entries. Raises UserError on anything unsafe."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), list):
        raise UserError(f"not a format-{FORMAT} checkpoint manifest")
    seen = set()
    for entry in manifest["files"]:
        if not isinstance(entry, dict) or not {"path", "size", "sha256"} <= entry.keys():
            raise UserError(f"manifest entry {entry!r} lacks path/size/sha256")
        path = entry["path"]
        if not isinstance(path, str) or not path or "\\" in path or "\x00" in path:
            raise UserError(f"manifest path {path!r} is empty or has a backslash/NUL")
        parts = PurePosixPath(path).parts
        if path.startswith("/") or any(p in ("", ".", "..") for p in path.split("/")) or not parts:
            raise UserError(f"manifest path {path!r} is absolute or leaves its folder")
        if len(path) > 2 and path[1] == ":":  # a Windows drive letter ("C:x") is absolute on Windows
            raise UserError(f"manifest path {path!r} is absolute")
        if path == MANIFEST_NAME or path in seen:
            raise UserError(f"manifest path {path!r} is listed twice or shadows the manifest")
        if not isinstance(entry["size"], int) or entry["size"] < 0 or not _is_sha256(entry["sha256"]):
            raise UserError(f"manifest entry for {path!r} has a bad size or sha256")
        seen.add(path)
    return manifest["files"]


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def safe_join(dest: str | Path, rel: str) -> Path:
    """dest/rel, refusing anything that resolves outside dest (symlinked parents included)."""
    root = Path(dest).resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root) or target == root:
        raise UserError(f"manifest path {rel!r} points outside {root}")
    return target


def verify_file(path: str | Path, entry: dict) -> None:
    """Check a downloaded file against its manifest entry; a bad file is deleted so nothing half-trusted stays."""
    path = Path(path)
    size = path.stat().st_size
    if size != entry["size"]:
        path.unlink()
        raise UserError(f"{entry['path']}: size {size} != manifest {entry['size']} (file deleted)")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        path.unlink()
        raise UserError(f"{entry['path']}: sha256 mismatch (file deleted); the checkpoint is corrupt or tampered")


def verify_folder(folder: str | Path, *, sha256: bool = True) -> dict:
    """Check a local checkpoint folder against its manifest.json (sizes; sha256 too unless told not to). Returns
    the manifest; a UserError names the first bad file. Nothing is deleted: the folder may be the only copy."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{folder} has no {MANIFEST_NAME}: not a complete checkpoint")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    for entry in check_manifest_paths(manifest):
        file = safe_join(folder, entry["path"])
        if not file.is_file():
            raise UserError(f"{folder}: {entry['path']} is missing")
        if file.stat().st_size != entry["size"]:
            raise UserError(f"{folder}: {entry['path']} has {file.stat().st_size} bytes, its manifest says "
                            f"{entry['size']}")
        if sha256 and sha256_file(file) != entry["sha256"]:
            raise UserError(f"{folder}: {entry['path']} does not match its sha256 in the manifest")
    return manifest


def dumps(manifest: dict) -> str:
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"
