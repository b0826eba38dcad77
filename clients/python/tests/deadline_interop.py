#!/usr/bin/env python3
"""Interop with AWS Deadline Cloud's own library, both ways, on one folder
that Deadline's uploader already attached (tests/fixtures/deadline_upload.py):
the client attaches the same folder to the same store (so it finds every
Data/ object there and uploads only its manifest), and Deadline's
`decode_manifest` parses the client's manifest.

Usage: deadline_interop.py ENDPOINT BUCKET ROOT_PREFIX FOLDER DEADLINE_MANIFEST_KEY

Prints {"deadline": [[path, hash, size, mtime]...], "ours": [...],
"same_bytes": bool, "uploaded_keys": [...], "input": {...}}."""

import json
import os
import sys

endpoint, bucket, root_prefix, folder, theirs_key = sys.argv[1:6]
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import boto3  # noqa: E402
from deadline.job_attachments.asset_manifests.decode import decode_manifest  # noqa: E402

from renderq_client import S3Store, attach  # noqa: E402

s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
store = S3Store("assets", bucket, endpoint_url=endpoint, region="us-east-1")
done = attach([folder], store, root=folder, dest="shot/", prefix=root_prefix)

theirs_bytes = s3.get_object(Bucket=bucket, Key=theirs_key)["Body"].read()
ours_bytes = s3.get_object(Bucket=bucket, Key=done.manifest_key)["Body"].read()


def rows(text):
    manifest = decode_manifest(text.decode())
    assert manifest.manifestVersion.value == "2023-03-03", manifest.manifestVersion
    assert manifest.hashAlg.value == "xxh128", manifest.hashAlg
    return sorted([p.path, p.hash, p.size, p.mtime] for p in manifest.paths)


print(json.dumps({
    "deadline": rows(theirs_bytes),
    "ours": rows(ours_bytes),
    "same_bytes": theirs_bytes == ours_bytes,
    "uploaded_keys": done.uploaded,
    "input": done.input,
}))
