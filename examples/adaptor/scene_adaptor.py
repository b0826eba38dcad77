#!/usr/bin/env python3
"""A renderq adaptor: loads a "scene" once, then renders many frames from it.

It speaks the adaptor protocol of renderq (JSON lines; see the README): it
answers `init` with `ready` once the scene is loaded, each `run` with
progress and a `result` (a PNG in the run's workdir) or a `fail`, and `stop`
with `stopped`. Logs go to stderr: stdout belongs to the protocol.

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
import struct
import sys
import time
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


class Scene:
    def __init__(self, name, load_seconds):
        time.sleep(load_seconds)
        digest = hashlib.sha256(name.encode()).digest()
        self.name = name
        self.colour_a = digest[0:3]
        self.colour_b = digest[3:6]

    def render(self, frame, width, height, seconds):
        rows = []
        shift = (frame * 7) % max(width, 1)
        for y in range(height):
            row = bytearray()
            for x in range(width):
                t = ((x + shift) % width) / max(width - 1, 1)
                u = y / max(height - 1, 1)
                for a, b in zip(self.colour_a, self.colour_b):
                    row.append(int(a * (1 - t) * (1 - u / 2) + b * t * (0.5 + u / 2)) & 0xFF)
            rows.append(bytes(row))
            if height >= 4 and y % (height // 4) == 0:
                send({"type": "progress", "percent": 100.0 * y / height})
                if seconds:
                    time.sleep(seconds / 4)
        return png(width, height, rows)


def main():
    scene = None
    for line in sys.stdin:
        message = json.loads(line)
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
            params = message.get("parameters", {})
            if params.get("noop"):
                send({"type": "result", "json": {"frame": params.get("frame", 0)}})
                continue
            if params.get("fail"):
                send({"type": "fail", "message": params["fail"]})
                continue
            frame = int(params.get("frame", 1))
            send({"type": "status", "message": f"rendering frame {frame} of {scene.name}"})
            image = scene.render(frame, int(params.get("width", 64)), int(params.get("height", 48)),
                                 float(params.get("seconds", 0)))
            name = f"frame_{frame:04d}.png"
            with open(os.path.join(message["workdir"], name), "wb") as f:
                f.write(image)
            send({"type": "progress", "percent": 100.0})
            send({"type": "result", "path": name, "mime": "image/png"})
        elif kind == "cancel":
            send({"type": "fail", "message": "cancelled"})
        elif kind == "stop":
            send({"type": "stopped"})
            return


if __name__ == "__main__":
    main()
