"""renderq's Python client.

- :class:`Client`: the JSON-RPC endpoint (submit, status, wait, cancel,
  redrive, list commands); refusals raise :class:`RenderqError` with the
  JSON-RPC ``code``, ``message`` and ``field``.
- :func:`attach`: files to a bucket, content-addressed, as an AWS Deadline
  Cloud ``2023-03-03`` manifest; returns the submit's ``inputs`` entry.
- :class:`S3Store`, :class:`LocalStore`: the buckets it writes to.
"""

from .attach import Attachment, ManifestFile, attach, encode_manifest, hash_file, missing_keys
from .rpc import FINAL_STATES, Client, RenderqError, is_final
from .stores import Calls, LocalStore, S3Store, Store, store_from_url

__all__ = [
    "Attachment",
    "Calls",
    "Client",
    "FINAL_STATES",
    "LocalStore",
    "ManifestFile",
    "RenderqError",
    "S3Store",
    "Store",
    "attach",
    "encode_manifest",
    "hash_file",
    "is_final",
    "missing_keys",
    "store_from_url",
]
