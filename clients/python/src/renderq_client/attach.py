"""Content-addressed attachments (SPEC §6a, §14): files hashed with xxh128,
an AWS Deadline Cloud ``2023-03-03`` manifest, and only the
``Data/<hash>.xxh128`` objects the bucket lacks uploaded."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Union

import xxhash

from .stores import Calls, Store

MANIFEST_VERSION = "2023-03-03"
HASH_ALG = "xxh128"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ManifestFile:
    """One file of a manifest: its path relative to the input's folder
    (``/``-separated), xxh128, size and mtime in microseconds."""

    path: str
    hash: str
    size: int
    mtime: int


@dataclass
class Attachment:
    """What :func:`attach` did. ``input`` goes in a submit's ``inputs``."""

    input: Dict[str, str]
    manifest_key: str
    files: List[ManifestFile]
    uploaded: List[str] = field(default_factory=list)
    calls: Calls = field(default_factory=Calls)
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)


def hash_file(path: str) -> str:
    """A file's xxh128 (XXH3, 128 bits), 32 hex digits, as Deadline Cloud
    writes it."""
    hasher = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                return hasher.hexdigest()
            hasher.update(chunk)


def encode_manifest(files: Iterable[ManifestFile]) -> bytes:
    """A ``2023-03-03`` manifest as Deadline Cloud writes it (canonical
    JSON: sorted keys, no spaces, paths in UTF-16 order)."""
    paths = sorted(files, key=lambda f: f.path.encode("utf-16_be", errors="surrogatepass"))
    manifest = {
        "hashAlg": HASH_ALG,
        "manifestVersion": MANIFEST_VERSION,
        "paths": [{"hash": f.hash, "mtime": f.mtime, "path": f.path, "size": f.size} for f in paths],
        "totalSize": sum(f.size for f in paths),
    }
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _join(prefix: str, key: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{key}" if prefix else key


def _expand(files: Union[Iterable[str], Mapping[str, str]], root: Optional[str]) -> Dict[str, str]:
    """``{manifest path: local file}``: a mapping as given, or paths (files
    or folders) at their place relative to ``root``."""
    if isinstance(files, Mapping):
        mapped = {str(k).replace(os.sep, "/").lstrip("/"): os.path.abspath(v) for k, v in files.items()}
    else:
        given = [os.path.abspath(p) for p in files]
        if root is None:
            dirs = [p if os.path.isdir(p) else os.path.dirname(p) for p in given]
            root = os.path.commonpath(dirs) if dirs else os.getcwd()
        root = os.path.abspath(root)
        mapped = {}
        for path in given:
            if not os.path.exists(path):
                raise FileNotFoundError(f"attach: no such file: {path}")
            walked = [path]
            if os.path.isdir(path):
                walked = [os.path.join(d, n) for d, _, names in os.walk(path) for n in names]
            for local in walked:
                rel = os.path.relpath(local, root)
                if rel.startswith(".." + os.sep) or rel == ".." or os.path.isabs(rel):
                    raise ValueError(f"attach: {local} is outside root {root}")
                mapped[rel.replace(os.sep, "/")] = local
    for rel, local in mapped.items():
        if not rel or any(part in ("", ".", "..") for part in rel.split("/")):
            raise ValueError(f"attach: path {rel!r} (for {local}) must be relative, without . or ..")
        if not os.path.isfile(local):
            raise FileNotFoundError(f"attach: no such file: {local}")
    return mapped


def missing_keys(store: Store, keys: Set[str], prefix: str) -> Set[str]:
    """Which of ``keys`` (all under ``prefix``) the bucket lacks, in as few
    calls as one ``HEAD`` each or a listing allows: each listing page
    starts just before the smallest key still unknown, so it answers for
    every key up to its last; a single unknown key costs one ``HEAD``."""
    unknown = sorted(keys)
    missing: Set[str] = set()
    lister = getattr(store, "list_page", None)
    while unknown:
        if len(unknown) == 1 or lister is None:
            for key in unknown:
                if not store.exists(key):
                    missing.add(key)
            return missing
        page, truncated = lister(prefix, unknown[0][:-1])
        present = set(page)
        last = page[-1] if page and truncated else None
        still = []
        for key in unknown:
            if last is not None and key > last:
                still.append(key)
            elif key not in present:
                missing.add(key)
        if still == unknown:
            lister = None
        unknown = still
    return missing


def attach(
    files: Union[Iterable[str], Mapping[str, str]],
    bucket: Store,
    root: Optional[str] = None,
    *,
    dest: str = "inputs/",
    prefix: str = "",
    concurrency: int = 16,
) -> Attachment:
    """Attaches files to a job: hashes them, uploads the ones the bucket
    lacks to ``PREFIX/Data/<hash>.xxh128`` (concurrently; multipart for
    large files on S3), writes the manifest to
    ``PREFIX/Manifests/<hash of manifest>.json`` (if not already there),
    and returns the :class:`Attachment` whose ``input`` is the submit's
    inputs entry (``{"bucket", "manifest", "path": dest}``).

    ``files``: paths (files or folders; each placed at its path relative
    to ``root``, by default their common folder), or a mapping ``{path in
    the job: local file}``. ``bucket``: a
    :class:`~renderq_client.LocalStore` or :class:`~renderq_client.S3Store`
    named as in the farm's ``workers.toml``.
    """
    started = time.monotonic()
    mapped = _expand(files, root)
    items = sorted(mapped.items())

    def describe(item: Any) -> ManifestFile:
        rel, local = item
        stat = os.stat(local)
        return ManifestFile(rel, hash_file(local), stat.st_size, stat.st_mtime_ns // 1000)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        described = list(pool.map(describe, items))
        data_prefix = _join(prefix, "Data/")
        local_of: Dict[str, str] = {}
        for (_, local), f in zip(items, described):
            local_of.setdefault(f"{data_prefix}{f.hash}.xxh128", local)
        lacking = missing_keys(bucket, set(local_of), data_prefix)
        uploads = sorted(lacking)
        list(pool.map(lambda key: bucket.put_file(key, local_of[key]), uploads))

    manifest = encode_manifest(described)
    manifest_key = _join(prefix, f"Manifests/{xxhash.xxh3_128_hexdigest(manifest)}.json")
    if not bucket.exists(manifest_key):
        bucket.put_bytes(manifest_key, manifest, "application/json")
        uploads.append(manifest_key)
    if not dest.endswith("/"):
        dest += "/"
    return Attachment(
        input={"bucket": bucket.name, "manifest": manifest_key, "path": dest},
        manifest_key=manifest_key,
        files=described,
        uploaded=uploads,
        calls=bucket.calls,
        seconds=time.monotonic() - started,
    )


__all__: List[str] = [
    "Attachment",
    "ManifestFile",
    "attach",
    "encode_manifest",
    "hash_file",
    "missing_keys",
    "MANIFEST_VERSION",
]
