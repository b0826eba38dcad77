#!/usr/bin/env python3
"""Submits the pipeline example's three stages in one go:

1. `blender_render`: the shot's frames, an array (2 frames a child), on the
   `renders` queue; each frame uploaded as `renders/RENDER_ID/N.png`;
2. `pipeline_composite`: one child per frame on the same queue, each
   waiting only for the render child that holds its frame
   (`depends_on` `frames: "same"`); uploads `comps/COMP_ID/N.png`;
3. `pipeline_encode`: one job, waiting for every composite
   (`frames: "all"`); uploads the MP4 as `movies/ENCODE_ID.mp4`.

    submit.py [--url http://127.0.0.1:8080/] [--shot shots/010] [--frames 1-24]

prints {"render", "composite", "encode", "movie"} as JSON. `--sequential`
sends no `depends_on`: it waits for each stage to complete before it
submits the next (for a server without dependencies). With a token
configured, RENDERQ_TOKEN holds it.
"""

import argparse
import json
import os
import sys
import time
import urllib.request

parser = argparse.ArgumentParser(prog="submit.py")
parser.add_argument("--url", default="http://127.0.0.1:8080/")
parser.add_argument("--shot", default="shots/010", help="the shot's folder in the assets bucket")
parser.add_argument("--frames", default="1-24")
parser.add_argument("--chunk-size", type=int, default=2, help="frames per render child")
parser.add_argument("--name", default="shot010")
parser.add_argument("--owner", default=os.environ.get("USER") or "pipeline")
parser.add_argument("--sequential", action="store_true")
parser.add_argument("--timeout", type=float, default=1800, help="--sequential: seconds per stage")
args = parser.parse_args()


def call(method, params):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
    request = urllib.request.Request(args.url, body.encode(), {"Content-Type": "application/json"})
    if os.environ.get("RENDERQ_TOKEN"):
        request.add_header("Authorization", "Bearer " + os.environ["RENDERQ_TOKEN"])
    with urllib.request.urlopen(request) as response:
        reply = json.load(response)
    if "error" in reply:
        sys.exit(f"{method} refused: {json.dumps(reply['error'])}")
    return reply["result"]


def after(job_id, frames):
    """The `depends_on` of a stage, or none when stages go one by one."""
    if args.sequential:
        wait(job_id)
        return {}
    return {"depends_on": [{"job_id": job_id, "frames": frames, "on": "success"}]}


def wait(job_id):
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            status = call("queue_manager_job_status", {"job_id": job_id})
        except SystemExit:
            status = {}
        if status.get("completed"):
            if status.get("succeeded") != status.get("size"):
                sys.exit(f"stage {job_id} ended with failures: {json.dumps(status)}")
            return
        time.sleep(0.5)
    sys.exit(f"stage {job_id} did not complete within {args.timeout} s")


def upload(key):
    return [{"name": "s3_upload", "config": {"bucket": "results", "key": key}}]


label = {"owner": args.owner, "metadata": {"shot": args.shot}}
render = call("queue_manager_submit_job", {
    "command": "blender_render",
    "queue_name": "renders",
    "parameters": {"scene": "scene.blend"},
    "frames": args.frames,
    "chunk_size": args.chunk_size,
    "inputs": [
        {"bucket": "assets", "key": f"{args.shot}/scene.blend", "path": "scene.blend"},
        {"bucket": "assets", "key": f"{args.shot}/textures/checker.png",
         "path": "textures/checker.png"},
    ],
    "tasks": upload("renders/${job_id}/${frame}.${mime_ext}"),
    "name": f"{args.name}_render",
    **label,
})["job_id"]
composite = call("queue_manager_submit_job", {
    "command": "pipeline_composite",
    "queue_name": "renders",
    "parameters": {"render_job": render},
    "frames": args.frames,
    "tasks": upload("comps/${job_id}/${frame}.${mime_ext}"),
    "name": f"{args.name}_comp",
    **label,
    **after(render, "same"),
})["job_id"]
encode = call("queue_manager_submit_job", {
    "command": "pipeline_encode",
    "queue_name": "renders",
    "parameters": {"comp_job": composite},
    "tasks": upload("movies/${message_id}.${mime_ext}"),
    "name": f"{args.name}_encode",
    **label,
    **after(composite, "all"),
})
print(json.dumps({"render": render, "composite": composite, "encode": encode,
                  "movie": f"movies/{encode}.mp4"}))
