"""The Blender side of the renderq Blender adaptor (see adaptor.py): runs
inside Blender, reads `init`, `run` and `stop` from the file descriptor it
is given and writes its answers to the other, every one of them echoing
the run's `id`.

- `init`: answers `ready` (`init_data.loads_file`, optional: a line is
  appended there for every scene load, so tests can count them).
- `run`: `parameters.scene` is the .blend, relative to the run's `workdir`.
  It is loaded only when it is not the scene already open: one with the
  same content (each job gets its own copy of a cached input, so an inode
  tells nothing; see `Scene`).
  Texture paths relative to the scene (`//textures/a.png`) are pointed at
  the new job's folder. Renders the run's `frames` (or `parameters.frame`),
  reporting progress per frame and per sample, and answers one result with
  every frame's PNG.
- `stop`: quits Blender.

A cancel never reaches this side: adaptor.py kills this Blender instead.
"""

import hashlib
import json
import os
import sys

import bpy

argv = sys.argv[sys.argv.index("--") + 1:]
incoming = os.fdopen(int(argv[0]), "r")
outgoing = os.fdopen(int(argv[1]), "w")


def send(message):
    outgoing.write(json.dumps(message) + "\n")
    outgoing.flush()


class Scene:
    """The open scene: the SHA-256 of the file it came from, and its
    images' paths.

    A scene is known by its content. Each job gets its own copy of a cached
    input, so the same scene comes as a new file every time; and an inode
    number names another file once the first is unlinked and the number is
    reused (a later job once got the previous job's scene rendered that
    way). Hashing a scene costs far less than loading it."""

    def __init__(self):
        self.identity = None
        self.relative_images = {}

    def open(self, path, loads_file):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        identity = digest.hexdigest()
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


def render(scene, message, loads_file):
    run_id = message["id"]
    params = message.get("parameters", {})
    workdir = message["workdir"]
    frames = message.get("frames") or [int(params.get("frame", 1))]
    scene.open(os.path.join(workdir, params["scene"]), loads_file)
    bpy_scene = bpy.context.scene
    bpy_scene.render.image_settings.file_format = "PNG"
    paths = []
    for done, frame in enumerate(frames):
        bpy_scene.frame_set(frame)
        name = f"frame_{frame:04d}.png"
        bpy_scene.render.filepath = os.path.join(workdir, name)
        send({"type": "status", "id": run_id, "message": f"rendering frame {frame}"})

        def on_sample(_scene, _depsgraph=None, done=done):
            # Called as the render progresses (Cycles: every sample); the
            # worker sends at most one progress event a second.
            send({"type": "progress", "id": run_id,
                  "percent": 100.0 * (done + 0.5) / len(frames)})

        bpy.app.handlers.render_stats.append(on_sample)
        try:
            bpy.ops.render.render(write_still=True)
        finally:
            bpy.app.handlers.render_stats.remove(on_sample)
        send({"type": "progress", "id": run_id, "percent": 100.0 * (done + 1) / len(frames)})
        paths.append(name)
    return {"type": "result", "id": run_id, "paths": paths, "mime": "image/png"}


scene = Scene()
loads_file = None
for line in incoming:
    message = json.loads(line)
    kind = message.get("type")
    if kind == "init":
        loads_file = message.get("init_data", {}).get("loads_file")
        send({"type": "ready"})
    elif kind == "run":
        try:
            send(render(scene, message, loads_file))
        except Exception as error:  # the job fails; the adaptor lives on
            send({"type": "fail", "id": message["id"], "message": f"{type(error).__name__}: {error}"})
    elif kind == "stop":
        break
bpy.ops.wm.quit_blender()
