"""The Blender side of the renderq Blender adaptor (see adaptor.py): runs
inside Blender, reads `init`, `run` and `stop` from the file descriptor it
is given and writes its answers to the other, every one of them echoing
the run's `id`.

- `init`: answers `ready` (`init_data.loads_file`, optional: a line is
  appended there for every scene load, so tests can count them).
- `run`: `parameters.scene` is the .blend, relative to the run's `workdir`.
  It is loaded only when it is not the scene already open (see `Scene`).
  Texture paths relative to the scene (`//textures/a.png`) are pointed at
  the new job's folder. Renders the run's `frames` (or `parameters.frame`),
  reporting progress per frame and per sample, and answers one result with
  every frame's PNG.
- `stop`: quits Blender.

A cancel never reaches this side: adaptor.py kills this Blender instead.
"""

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


def identity(stat):
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class Scene:
    """The open scene: the file it came from, and its images' paths.

    A scene is known by its file, held open while it is loaded: an inode
    number alone names another file once the first is unlinked (the input
    cache evicts, job folders are removed) and the number is reused, and
    then a later job would get this scene rendered. An open file's inode
    cannot be reused, so a path whose device and inode match it, with the
    same size and modification time, is this very file; the input cache
    checks the same size and time before each use, so the file was not
    rewritten since. The same file reached through the cache in another
    job is a hard link to it, and is not loaded again."""

    def __init__(self):
        self.file = None
        self.identity = None
        self.relative_images = {}

    def open(self, path, loads_file):
        if self.file is None or identity(os.stat(path)) != self.identity:
            file = open(path, "rb")
            bpy.ops.wm.open_mainfile(filepath=path)
            if self.file is not None:
                self.file.close()
            self.file, self.identity = file, identity(os.fstat(file.fileno()))
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
