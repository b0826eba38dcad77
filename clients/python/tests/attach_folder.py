#!/usr/bin/env python3
"""Attaches a folder with the client and prints what it did (checked by
tests/clients.rs and used by `renderq bench`-style measurements).

Usage: attach_folder.py BUCKET_URL NAME FOLDER [--endpoint URL] [--prefix P]
                        [--dest D] [--make COUNT SIZE]

BUCKET_URL: s3://BUCKET or a local bucket's folder; NAME: its name in
workers.toml. --make first writes COUNT files of SIZE bytes (each its own
content) under FOLDER, in folders of 1,000.

Prints {"input", "files", "bytes", "uploaded" (a count), "uploaded_keys"
(when at most 100), "calls", "seconds"}."""

import argparse
import json
import os

from renderq_client import attach, store_from_url

parser = argparse.ArgumentParser()
parser.add_argument("bucket_url")
parser.add_argument("name")
parser.add_argument("folder")
parser.add_argument("--endpoint", default=None)
parser.add_argument("--prefix", default="")
parser.add_argument("--dest", default="inputs/")
parser.add_argument("--make", nargs=2, type=int, default=None)
args = parser.parse_args()

if args.make:
    count, size = args.make
    for i in range(count):
        folder = os.path.join(args.folder, f"part{i // 1000:03d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"file{i:05d}.bin"), "wb") as f:
            f.write(f"{i:08d}".encode() * (size // 8) + b"x" * (size % 8))

store = store_from_url(args.name, args.bucket_url, endpoint_url=args.endpoint)
done = attach([args.folder], store, root=args.folder, dest=args.dest, prefix=args.prefix)
print(json.dumps({
    "input": done.input,
    "files": len(done.files),
    "bytes": done.bytes,
    "uploaded": len(done.uploaded),
    "uploaded_keys": done.uploaded if len(done.uploaded) <= 100 else None,
    "calls": done.calls.as_dict(),
    "seconds": round(done.seconds, 3),
}))
