#!/usr/bin/env python3
"""A renderq adaptor: loads a "scene" once, then renders many frames from it.

It speaks the adaptor protocol of renderq (JSON lines; see the README): it
answers `init` with `ready` once the scene is loaded, each `run` with
progress and one answer, a `result` (a PNG in the run's workdir) or a
`fail`, every one of them echoing the run's `id`; and `stop` with
`stopped`. A `cancel` for the run in progress stops it at its next row
(the run's answer is then `fail`); a `cancel` for a run already answered
gets no answer. Logs go to stderr: stdout belongs to the protocol.

init_data keys:
  scene         name of the scene; its colours derive from it
  load_seconds  how long "loading" takes (the cost an adaptor pays only once)
  starts_file   optional: a line "<pid>" is appended here on every start

run parameters:
  frame, width, height   what to render
  seconds                extra time to spend rendering (for tests)
  noop                   answer at once with a JSON result (for benchmarks)
  fail                   answer with this failure message
"""

import hashlib
import json
import os
import queue
import struct
import sys
import threading
import zlib


def send(message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def png(width, height, rows):
    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + row for row in rows)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


class Cancelled(Exception):
    """The run in progress was cancelled."""


class Scene:
    def __init__(self, name, load_seconds):
        threading.Event().wait(load_seconds)
        digest = hashlib.sha256(name.encode()).digest()
        self.name = name
        self.colour_a = digest[0:3]
        self.colour_b = digest[3:6]

    def render(self, run_id, frame, width, height, seconds, cancel):
        rows = []
        shift = (frame * 7) % max(width, 1)
        for y in range(height):
            if cancel.is_set():
                raise Cancelled()
            row = bytearray()
            for x in range(width):
                t = ((x + shift) % width) / max(width - 1, 1)
                u = y / max(height - 1, 1)
                for a, b in zip(self.colour_a, self.colour_b):
                    row.append(int(a * (1 - t) * (1 - u / 2) + b * t * (0.5 + u / 2)) & 0xFF)
            rows.append(bytes(row))
            if height >= 4 and y % (height // 4) == 0:
                send({"type": "progress", "id": run_id, "percent": 100.0 * y / height})
                if seconds and cancel.wait(seconds / 4):
                    raise Cancelled()
        return png(width, height, rows)


class Runs:
    """The run in progress, and its cancel. The protocol is read on a
    thread of its own, so that a `cancel` arrives while a frame renders."""

    def __init__(self):
        self.lock = threading.Lock()
        self.current = None  # the id of the run not answered yet
        self.cancel = threading.Event()

    def begin(self, run_id):
        with self.lock:
            self.current = run_id
            self.cancel.clear()

    def cancelled(self, run_id):
        with self.lock:
            if run_id == self.current:
                self.cancel.set()

    def answer(self, run_id, message):
        """The run's one answer: no `cancel` can reach it after this."""
        with self.lock:
            self.current = None
        send(dict(message, id=run_id))


def read(messages, runs):
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("type") == "cancel":
            runs.cancelled(message.get("id"))
        else:
            messages.put(message)
    messages.put({"type": "stop"})


def run(scene, message, runs):
    run_id = message["id"]
    params = message.get("parameters", {})
    if params.get("noop"):
        return {"type": "result", "json": {"frame": params.get("frame", 0)}}
    if params.get("fail"):
        return {"type": "fail", "message": params["fail"]}
    frame = int(params.get("frame", 1))
    send({"type": "status", "id": run_id, "message": f"rendering frame {frame} of {scene.name}"})
    try:
        image = scene.render(run_id, frame, int(params.get("width", 64)), int(params.get("height", 48)),
                             float(params.get("seconds", 0)), runs.cancel)
    except Cancelled:
        return {"type": "fail", "message": "cancelled"}
    name = f"frame_{frame:04d}.png"
    with open(os.path.join(message["workdir"], name), "wb") as f:
        f.write(image)
    send({"type": "progress", "id": run_id, "percent": 100.0})
    return {"type": "result", "path": name, "mime": "image/png"}


def main():
    scene = None
    messages, runs = queue.Queue(), Runs()
    threading.Thread(target=read, args=(messages, runs), daemon=True).start()
    while True:
        message = messages.get()
        kind = message.get("type")
        if kind == "init":
            data = message.get("init_data", {})
            starts_file = data.get("starts_file")
            if starts_file:
                with open(starts_file, "a") as f:
                    f.write(f"{os.getpid()}\n")
            scene = Scene(data.get("scene", "default"), float(data.get("load_seconds", 0)))
            print(f"scene {scene.name!r} loaded", file=sys.stderr)
            send({"type": "ready"})
        elif kind == "run":
            runs.begin(message["id"])
            runs.answer(message["id"], run(scene, message, runs))
        elif kind == "stop":
            send({"type": "stopped"})
            return


if __name__ == "__main__":
    main()
