"""The Blender side of the renderq Blender adaptor (see adaptor.py): runs
inside Blender and speaks renderq's adaptor protocol on the file
descriptors it is given.

- `init`: answers `ready` (`init_data.loads_file`, optional: a line is
  appended there for every scene load, so tests can count them).
- `run`: `parameters.scene` is the .blend, relative to the run's `workdir`.
  It is loaded only when it is not the scene already open: one of the same
  size, modification time and content (each job gets its own copy of a
  cached input, so the inode tells nothing).
  Texture paths relative to the scene (`//textures/a.png`) are pointed at
  the new job's folder. Renders the run's `frames` (or `parameters.frame`),
  reporting progress per frame and per sample, and answers one result with
  every frame's PNG.
- `cancel`: the render in progress stops at its next sample and the run
  answers `fail`.
- `stop`: answers `stopped` and quits Blender.
"""

import hashlib
import json
import os
import queue
import sys
import threading

import bpy

argv = sys.argv[sys.argv.index("--") + 1:]
incoming = os.fdopen(int(argv[0]), "r")
outgoing = os.fdopen(int(argv[1]), "w")
messages = queue.Queue()
cancelled = threading.Event()


def send(message):
    outgoing.write(json.dumps(message) + "\n")
    outgoing.flush()


def read():
    """Reads the protocol on a thread of its own, so `cancel` arrives while
    Blender renders."""
    for line in incoming:
        message = json.loads(line)
        if message.get("type") == "cancel":
            cancelled.set()
        messages.put(message)
    messages.put({"type": "stop"})


class Scene:
    """The open scene: which file it came from, and its images' paths."""

    def __init__(self):
        self.identity = None
        self.relative_images = {}

    def open(self, path, loads_file):
        stat = os.stat(path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        identity = (stat.st_size, stat.st_mtime_ns, digest.hexdigest())
        if identity != self.identity:
            bpy.ops.wm.open_mainfile(filepath=path)
            self.identity = identity
            self.relative_images = {
                image.name: image.filepath[2:]
                for image in bpy.data.images
                if image.filepath.startswith("//")
            }
            if loads_file:
                with open(loads_file, "a") as f:
                    f.write(f"{os.getpid()} {path}\n")
            print(f"renderq adaptor: loaded {path}", file=sys.stderr)
        # Relative paths followed the file first opened: point them here.
        folder = os.path.dirname(path)
        for name, relative in self.relative_images.items():
            image = bpy.data.images.get(name)
            if image is not None:
                image.filepath = os.path.join(folder, relative)
                image.reload()


def render(scene, message):
    params = message.get("parameters", {})
    workdir = message["workdir"]
    frames = message.get("frames") or [int(params.get("frame", 1))]
    scene.open(os.path.join(workdir, params["scene"]), loads_file)
    bpy_scene = bpy.context.scene
    bpy_scene.render.image_settings.file_format = "PNG"
    paths = []
    for done, frame in enumerate(frames):
        if cancelled.is_set():
            return {"type": "fail", "message": "cancelled"}
        bpy_scene.frame_set(frame)
        name = f"frame_{frame:04d}.png"
        bpy_scene.render.filepath = os.path.join(workdir, name)
        send({"type": "status", "message": f"rendering frame {frame}"})

        def on_sample(_scene, _depsgraph=None, done=done):
            # Called as the render progresses (Cycles: every sample); the
            # worker sends at most one progress event a second.
            send({"type": "progress", "percent": 100.0 * (done + 0.5) / len(frames)})

        bpy.app.handlers.render_stats.append(on_sample)
        try:
            bpy.ops.render.render(write_still=True)
        finally:
            bpy.app.handlers.render_stats.remove(on_sample)
        send({"type": "progress", "percent": 100.0 * (done + 1) / len(frames)})
        paths.append(name)
    return {"type": "result", "paths": paths, "mime": "image/png"}


threading.Thread(target=read, daemon=True).start()
scene = Scene()
loads_file = None
while True:
    message = messages.get()
    kind = message.get("type")
    if kind == "init":
        loads_file = message.get("init_data", {}).get("loads_file")
        send({"type": "ready"})
    elif kind == "run":
        cancelled.clear()
        try:
            send(render(scene, message))
        except Exception as error:  # the job fails; the adaptor lives on
            send({"type": "fail", "message": f"{type(error).__name__}: {error}"})
    elif kind == "cancel":
        # Between runs: nothing to stop.
        if messages.empty():
            send({"type": "fail", "message": "cancelled"})
    elif kind == "stop":
        send({"type": "stopped"})
        break
bpy.ops.wm.quit_blender()
