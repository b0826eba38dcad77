#!/usr/bin/env python3
"""Drives every endpoint method of the client against a running renderq
(tests/clients.rs starts it and checks what this prints).

Usage: api_roundtrip.py URL   (the token in RENDERQ_TOKEN)

Prints one JSON object: what each call returned or raised."""

import json
import sys

from renderq_client import Client, RenderqError

url = sys.argv[1]
client = Client(url, timeout=30)
out = {}


def error(call):
    try:
        call()
    except RenderqError as e:
        return {"code": e.code, "field": e.field, "message": e.message}
    return None


out["commands"] = sorted(c["name"] for c in client.list_commands())

seen = []
plain = client.submit("render_demo", {"width": 16, "height": 8, "frame": 3})
out["plain"] = client.wait(plain, timeout=60, poll=0.1, progress=seen.append)
out["plain_progress"] = [s["state"] for s in seen]

array = client.submit("render_demo", {"width": 8, "height": 8}, frames="1-3", chunk_size=2,
                      notifications=[{"events": ["ArrayJobCompleted"], "target": "audit", "vars": {"shot": "010"}}])
out["array_ids"] = len(array["message_ids"])
out["array"] = client.wait(array["job_id"], timeout=60, poll=0.1)

sleeper = client.submit("sleep", {"seconds": 60})
out["cancel"] = client.cancel(sleeper)
out["cancelled"] = client.wait(sleeper, timeout=30, poll=0.1)

failing = client.submit("fails_quietly")
out["failed"] = client.wait(failing, timeout=60, poll=0.1)
out["stats_before_redrive"] = client.queue_stats()
out["redrive"] = client.redrive(out["failed"]["job_id"])

out["bad_token"] = error(lambda: Client(url, token="not the token").list_commands())
out["unknown_command"] = error(lambda: client.submit("no_such_command"))
out["refused_field"] = error(lambda: client.submit(
    "render_demo", inputs=[{"bucket": "assets", "key": "a", "path": "../escape"}]))
out["unknown_method"] = error(lambda: client.call("queue_manager_no_such_method"))
out["no_such_job"] = error(lambda: client.status("00000000-0000-0000-0000-000000000000"))
print(json.dumps(out))
