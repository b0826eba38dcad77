"""Where attached files go: an S3 bucket (boto3, any endpoint) or a renderq
local bucket folder (``[buckets.NAME] backend = "local"``: an object is the
file at ``FOLDER/KEY``)."""

from __future__ import annotations

import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple


@dataclass
class Calls:
    """What an attach asked of the bucket (counted from every upload
    thread)."""

    heads: int = 0
    lists: int = 0
    puts: int = 0
    bytes_sent: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, heads: int = 0, lists: int = 0, puts: int = 0, bytes_sent: int = 0) -> None:
        with self._lock:
            self.heads += heads
            self.lists += lists
            self.puts += puts
            self.bytes_sent += bytes_sent

    def as_dict(self) -> Dict[str, int]:
        return {"heads": self.heads, "lists": self.lists, "puts": self.puts, "bytes_sent": self.bytes_sent}


class Store:
    """An object store: what :func:`renderq_client.attach` needs of one."""

    #: The bucket's name in the farm's ``workers.toml`` (``[buckets.NAME]``).
    name: str
    calls: Calls

    def exists(self, key: str) -> bool:
        """Whether one object exists (one ``HEAD``)."""
        raise NotImplementedError

    def list_keys(self, prefix: str) -> Set[str]:
        """Every key under a prefix (a listing: one call per 1,000 keys)."""
        raise NotImplementedError

    def put_file(self, key: str, path: str) -> None:
        """Uploads a file (multipart when it is large)."""
        raise NotImplementedError

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        raise NotImplementedError


class LocalStore(Store):
    """A renderq local bucket: a folder. Objects are written to a temporary
    file under ``.renderq-tmp/`` and renamed into place, so the worker never
    reads half a file."""

    def __init__(self, name: str, folder: str) -> None:
        self.name = name
        self.folder = os.path.abspath(folder)
        self.calls = Calls()

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, *key.split("/"))

    def exists(self, key: str) -> bool:
        self.calls.add(heads=1)
        return os.path.isfile(self._path(key))

    def list_keys(self, prefix: str) -> Set[str]:
        self.calls.add(lists=1)
        top = self._path(prefix.rstrip("/")) if prefix.rstrip("/") else self.folder
        found: Set[str] = set()
        for root, _, names in os.walk(top):
            rel = os.path.relpath(root, self.folder).replace(os.sep, "/")
            for n in names:
                found.add(n if rel == "." else f"{rel}/{n}")
        return found

    def _write(self, key: str, fill: Any) -> None:
        tmp_dir = os.path.join(self.folder, ".renderq-tmp")
        os.makedirs(tmp_dir, exist_ok=True)
        target = self._path(key)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = os.path.join(tmp_dir, f"client-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as out:
                fill(out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def put_file(self, key: str, path: str) -> None:
        def fill(out: Any) -> None:
            with open(path, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)

        self._write(key, fill)
        self.calls.add(puts=1, bytes_sent=os.path.getsize(path))

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self._write(key, lambda out: out.write(data))
        self.calls.add(puts=1, bytes_sent=len(data))


class S3Store(Store):
    """An S3 bucket (or any S3 endpoint: MinIO, moto). Large files go up in
    parts through boto3's transfer manager (``multipart_threshold``)."""

    def __init__(
        self,
        name: str,
        bucket: str,
        *,
        endpoint_url: Optional[str] = None,
        region: Optional[str] = None,
        multipart_threshold: int = 16 * 1024 * 1024,
        session: Any = None,
        max_pool_connections: int = 32,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.name = name
        self.bucket = bucket
        self.calls = Calls()
        session = session or boto3.session.Session()
        self.client = session.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(max_pool_connections=max_pool_connections, retries={"mode": "standard"}),
        )
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_threshold,
            max_concurrency=4,
        )

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        self.calls.add(heads=1)
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def list_page(self, prefix: str, start_after: str) -> Tuple[List[str], bool]:
        """One listing call: up to 1,000 keys under ``prefix`` after
        ``start_after``, in order, and whether there are more."""
        self.calls.add(lists=1)
        page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, StartAfter=start_after, MaxKeys=1000)
        return [o["Key"] for o in page.get("Contents", [])], bool(page.get("IsTruncated"))

    def list_keys(self, prefix: str) -> Set[str]:
        found: Set[str] = set()
        token: Optional[str] = None
        while True:
            args: Dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": 1000}
            if token:
                args["ContinuationToken"] = token
            self.calls.add(lists=1)
            page = self.client.list_objects_v2(**args)
            found.update(o["Key"] for o in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return found
            token = page["NextContinuationToken"]

    def put_file(self, key: str, path: str) -> None:
        size = os.path.getsize(path)
        self.client.upload_file(path, self.bucket, key, Config=self.transfer)
        parts = 1 if size < self.transfer.multipart_threshold else -(-size // self.transfer.multipart_chunksize) + 2
        self.calls.add(puts=parts, bytes_sent=size)

    def put_bytes(self, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type)
        self.calls.add(puts=1, bytes_sent=len(data))


def store_from_url(name: str, url: str, *, endpoint_url: Optional[str] = None) -> Store:
    """A store from ``s3://BUCKET`` or a folder path (``file://`` or
    plain). ``name`` is the bucket's name in the farm's ``workers.toml``."""
    if url.startswith("s3://"):
        bucket = url[len("s3://"):].strip("/")
        if not bucket or "/" in bucket:
            raise ValueError(f"bucket url {url!r}: expected s3://BUCKET")
        return S3Store(name, bucket, endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None)
    if url.startswith("file://"):
        url = url[len("file://"):]
    return LocalStore(name, os.path.expanduser(url))


__all__: List[str] = ["Calls", "Store", "LocalStore", "S3Store", "store_from_url"]
