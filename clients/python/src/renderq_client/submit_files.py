"""Attach files and submit one job that reads them, in one call: what the
Blender add-on (and any submitter that runs outside this package's
Python) asks for, as ``python -m renderq_client submit-files SPEC.json``.

A spec::

    {"url": "http://127.0.0.1:8080/", "token_env": "RENDERQ_TOKEN",
     "bucket": {"name": "assets", "url": "s3://my-assets" | "/srv/assets",
                "endpoint_url": null, "prefix": ""},
     "files": {"scene.blend": "/tmp/copy.blend", "textures/a.png": "/home/a/a.png"},
     "dest": "scene/",
     "job": {"command": "blender_render", "parameters": {...}, "frames": "1-10",
             "chunk_size": 2, "tasks": [...], "queue_name": "renders"}}

The token and the command are checked with the endpoint before anything
is uploaded, so a refused submit uploads nothing.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

from .attach import attach
from .rpc import Client, RenderqError
from .stores import store_from_url


def submit_files(spec: Mapping[str, Any]) -> Dict[str, Any]:
    """Runs a spec; returns ``{"result", "monitor", "uploaded", "calls",
    "files", "seconds"}`` or raises :class:`RenderqError`."""
    client = Client(spec["url"], token=spec.get("token") or None, token_env=spec.get("token_env") or "RENDERQ_TOKEN")
    job = dict(spec["job"])
    command = job.pop("command")
    known = [c.get("name") for c in client.list_commands()]
    if command not in known:
        raise RenderqError(-32602, f"command `{command}` is not allowed here (allowed: {', '.join(known)})", {"field": "command"})
    bucket = spec["bucket"]
    store = store_from_url(bucket["name"], bucket["url"], endpoint_url=bucket.get("endpoint_url"))
    attached = attach(spec["files"], store, dest=spec.get("dest", "inputs/"), prefix=bucket.get("prefix", ""))
    parameters = job.pop("parameters", {})
    inputs = list(job.pop("inputs", [])) + [attached.input]
    queue = job.pop("queue_name", None) or None
    result = client.submit(command, parameters, inputs=inputs, queue=queue, **job)
    job_id = result["job_id"] if isinstance(result, dict) else result
    return {
        "result": result,
        "job_id": job_id,
        "monitor": client.monitor_url(job_id),
        "uploaded": attached.uploaded,
        "calls": attached.calls.as_dict(),
        "files": len(attached.files),
        "seconds": attached.seconds,
    }
