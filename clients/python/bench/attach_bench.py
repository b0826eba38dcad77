#!/usr/bin/env python3
"""Benchmark: attach a shot of SIZE bytes in COUNT files to S3 (moto, behind
tests/fixtures/s3_count_proxy.py, which counts every request), twice (the
second time unchanged), against `aws s3 sync` of the same folder through
the same proxy, twice.

    PYTHONPATH=clients/python/src python3 clients/python/bench/attach_bench.py [COUNT [MIB]]

(from the repository root; 200 files, 1024 MiB by default). Needs moto
(tests/requirements.txt) and, for the comparison, the `aws` CLI. Prints
one line per run: seconds, requests by method, bytes sent."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import boto3

from renderq_client import S3Store, attach

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
count = int(sys.argv[1]) if len(sys.argv) > 1 else 200
mib = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
os.environ.update(env)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def requests(count_file):
    try:
        with open(count_file) as f:
            return json.load(f)["by_method"]
    except FileNotFoundError:
        return {}


def delta(before, after):
    return {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before)) if after.get(k, 0) != before.get(k, 0)}


work = tempfile.mkdtemp(prefix="renderq-attach-bench-")
children = []
try:
    moto_port, proxy_port = free_port(), free_port()
    children.append(subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_port(moto_port)
    count_file = os.path.join(work, "count.json")
    children.append(subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests/fixtures/s3_count_proxy.py"), str(proxy_port), str(moto_port),
         "bench-", "0", "0", count_file], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_port(proxy_port)
    proxy = f"http://127.0.0.1:{proxy_port}"
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{moto_port}")
    for bucket in ("bench-attach", "bench-sync"):
        s3.create_bucket(Bucket=bucket)

    shot = os.path.join(work, "shot")
    os.makedirs(shot)
    size = mib * 1024 * 1024 // count
    for i in range(count):
        with open(os.path.join(shot, f"file{i:04d}.exr"), "wb") as f:
            f.write(os.urandom(size))
    print(f"shot: {count} files, {count * size / 2**20:.0f} MiB")

    for run in ("first", "unchanged"):
        before = requests(count_file)
        store = S3Store("assets", "bench-attach", endpoint_url=proxy)
        done = attach([shot], store, root=shot, dest="shot/")
        print(f"attach {run}: {done.seconds:.2f} s, requests {delta(before, requests(count_file))}, "
              f"{done.calls.bytes_sent / 2**20:.0f} MiB sent, {len(done.uploaded)} objects uploaded")

    if shutil.which("aws"):
        for run in ("first", "unchanged"):
            before = requests(count_file)
            started = time.monotonic()
            subprocess.run(["aws", "s3", "sync", "--only-show-errors", "--endpoint-url", proxy, shot,
                            "s3://bench-sync/shot"], check=True, env=env)
            print(f"aws s3 sync {run}: {time.monotonic() - started:.2f} s, "
                  f"requests {delta(before, requests(count_file))}")
    else:
        print("aws s3 sync: no `aws` CLI here (pip install awscli)")
finally:
    for child in children:
        child.kill()
        child.wait()
    shutil.rmtree(work, ignore_errors=True)
