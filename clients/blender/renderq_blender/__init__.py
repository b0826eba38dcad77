"""renderq for Blender: "Submit to renderq" in Output Properties.

It saves the file (when it has unsaved changes), collects the files the
scene uses, gives each a path relative to the scene for the farm (files in
the scene's folder keep theirs; files elsewhere go under
``_external/<folder id>/NAME``, the same place every time), saves a copy of
the ``.blend`` with those paths, attaches everything content-addressed
through the renderq Python client (only what the bucket lacks is uploaded),
and submits the frame range as an array. The job id goes to the report
area and the monitor's page opens.

The upload and the submit run in the Python that has ``renderq-client``
installed (``pip install ./clients/python``; preferences: "Python"), so
Blender's own Python needs nothing installed.

From a shell: ``renderq-submit-blender scene.blend --frames 1-240 --chunk 4``
(the client package runs Blender in the background with this add-on).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import bpy
from bpy.props import BoolProperty, IntProperty, PointerProperty, StringProperty

bl_info = {
    "name": "renderq",
    "author": "renderq",
    "version": (0, 1, 0),
    "blender": (3, 4, 0),
    "location": "Properties > Output > renderq",
    "description": "Submit the scene's frames to a renderq farm, its files attached content-addressed",
    "category": "Render",
}

#: Data-blocks whose ``filepath`` names a file the render reads.
FILE_BLOCKS = ("images", "libraries", "sounds", "movieclips", "fonts", "volumes", "cache_files")
#: Where files from outside the scene's folder go in the job.
EXTERNAL = "_external"


class RenderqSubmitError(Exception):
    """A submit that did not happen, with what to tell the user."""


class RenderqPreferences(bpy.types.AddonPreferences):
    bl_idname = __name__

    token: StringProperty(
        name="Token",
        description="The endpoint's bearer token (else the environment variable named in the panel)",
        subtype="PASSWORD",
    )
    python: StringProperty(
        name="Python",
        description="A Python with renderq-client installed (pip install ./clients/python); "
        "RENDERQ_PYTHON overrides it",
        default="python3",
    )

    def draw(self, context):
        self.layout.prop(self, "token")
        self.layout.prop(self, "python")


class RenderqSettings(bpy.types.PropertyGroup):
    url: StringProperty(name="Endpoint", default="http://127.0.0.1:8080/")
    token_env: StringProperty(name="Token variable", default="RENDERQ_TOKEN")
    queue: StringProperty(name="Queue", description="Empty: the farm's default queue")
    bucket: StringProperty(name="Bucket", description="The inputs bucket's name in workers.toml", default="assets")
    bucket_url: StringProperty(
        name="Bucket location",
        description="s3://BUCKET, or the local bucket's folder",
        default="",
    )
    endpoint_url: StringProperty(name="S3 endpoint", description="Empty: AWS (or AWS_ENDPOINT_URL)")
    command: StringProperty(name="Command", default="blender_render")
    chunk_size: IntProperty(name="Chunk size", default=4, min=1)
    frames: StringProperty(name="Frames", description="Empty: the scene's frame range")
    results_bucket: StringProperty(name="Results bucket", default="results")
    output_key: StringProperty(name="Output key", default="renders/${job_id}/${frame}.${mime_ext}")
    allow_missing: BoolProperty(
        name="Submit anyway",
        description="Submit even when files the scene uses are missing",
        default=False,
    )


def frames_of(scene, settings):
    return settings.frames.strip() or f"{scene.frame_start}-{scene.frame_end}"


def farm_path(path, scene_dir):
    """Where a file goes in the job, relative to the scene."""
    rel = os.path.relpath(path, scene_dir)
    if not rel.startswith(os.pardir + os.sep) and rel != os.pardir and not os.path.isabs(rel):
        return rel.replace(os.sep, "/")
    folder = hashlib.sha1(os.path.dirname(path).encode()).hexdigest()[:10]
    return f"{EXTERNAL}/{folder}/{os.path.basename(path)}"


def collect(scene_dir):
    """The files the open file uses: ``({farm path: file}, [(block,
    filepath as written, farm filepath)], [missing, by name])``."""
    files, remaps, missing = {}, [], []
    covered = set()
    for collection in FILE_BLOCKS:
        for block in getattr(bpy.data, collection, ()):
            written = getattr(block, "filepath", "")
            if not written or written == "<builtin>" or getattr(block, "packed_file", None) is not None:
                continue
            if collection == "images" and block.source not in {"FILE", "MOVIE"}:
                continue
            path = os.path.normpath(bpy.path.abspath(written, library=block.library))
            covered.add(path)
            if not os.path.isfile(path):
                missing.append(f"{block.name} ({written})")
                continue
            rel = farm_path(path, scene_dir)
            files[rel] = path
            if block.library is None:
                remaps.append((block, written, "//" + rel))
    # Whatever else the file names (sequences, caches): sent where it is
    # found, at its place relative to the scene.
    for path in bpy.utils.blend_paths(absolute=True):
        path = os.path.normpath(path)
        if path in covered or "#" in path or "<UDIM>" in path:
            continue
        if os.path.isfile(path):
            files.setdefault(farm_path(path, scene_dir), path)
        elif not os.path.isdir(path):
            missing.append(os.path.basename(path))
    return files, remaps, missing


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "renderq", "blender")


def farm_copy(blend, remaps):
    """The ``.blend`` as the farm reads it: saved with the farm's paths.
    One copy per (file content, paths), kept, so an unchanged scene is the
    same file (and the same upload) next time: Blender writes different
    bytes on every save."""
    digest = hashlib.sha256()
    with open(blend, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(json.dumps(sorted((b.name, new) for b, _, new in remaps)).encode())
    folder = os.path.join(cache_dir(), digest.hexdigest()[:32])
    copy = os.path.join(folder, os.path.basename(blend))
    if os.path.isfile(copy):
        return copy
    os.makedirs(folder, exist_ok=True)
    partial = os.path.join(folder, ".partial.blend")
    try:
        for block, _, new in remaps:
            block.filepath = new
        bpy.ops.wm.save_as_mainfile(filepath=partial, copy=True, relative_remap=False, compress=False)
    finally:
        for block, written, _ in remaps:
            block.filepath = written
    os.replace(partial, copy)
    if os.path.exists(partial + "1"):
        os.remove(partial + "1")
    return copy


def python_for_client():
    prefs = bpy.context.preferences.addons.get(__name__)
    configured = prefs.preferences.python if prefs else ""
    return os.environ.get("RENDERQ_PYTHON") or configured or "python3"


def token_from_preferences():
    prefs = bpy.context.preferences.addons.get(__name__)
    return prefs.preferences.token if prefs else ""


def submit_scene(scene, settings):
    """Saves, collects, attaches and submits; returns the client's outcome
    (``job_id``, ``monitor``, ``uploaded``, ...). Raises
    :class:`RenderqSubmitError` with what to tell the user."""
    if not bpy.data.filepath:
        raise RenderqSubmitError("Save the file first: renderq sends a saved .blend")
    if bpy.data.is_dirty:
        bpy.ops.wm.save_mainfile()
    blend = bpy.path.abspath(bpy.data.filepath)
    scene_dir = os.path.dirname(blend)
    files, remaps, missing = collect(scene_dir)
    if missing and not settings.allow_missing:
        raise RenderqSubmitError(
            "Missing files: " + ", ".join(missing) + ". Fix them, or tick \"Submit anyway\" (--allow-missing)"
        )
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(blend))
    files = {k: v for k, v in files.items() if k != name}
    files[name] = farm_copy(blend, remaps)
    if not settings.bucket_url:
        raise RenderqSubmitError("Set the bucket's location (s3://BUCKET or a local bucket folder)")
    dest = "scene/"
    job = {
        "command": settings.command,
        "parameters": {"scene": dest + name},
        "frames": frames_of(scene, settings),
        "chunk_size": settings.chunk_size,
        "tasks": [{"name": "s3_upload", "config": {"bucket": settings.results_bucket, "key": settings.output_key}}],
    }
    if settings.queue:
        job["queue_name"] = settings.queue
    spec = {
        "url": settings.url,
        "token": token_from_preferences(),
        "token_env": settings.token_env,
        "bucket": {"name": settings.bucket, "url": settings.bucket_url, "endpoint_url": settings.endpoint_url or None},
        "files": files,
        "dest": dest,
        "job": job,
    }
    with tempfile.TemporaryDirectory(prefix="renderq-") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        python = python_for_client()
        if shutil.which(python) is None and not os.path.isfile(python):
            raise RenderqSubmitError(f"No Python `{python}` for the renderq client (preferences: Python)")
        run = subprocess.run(
            [python, "-m", "renderq_client", "submit-files", spec_path], capture_output=True, text=True
        )
    try:
        outcome = json.loads(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RenderqSubmitError(f"The renderq client failed: {(run.stderr or run.stdout).strip()[-800:]}") from None
    if "error" in outcome:
        error = outcome["error"]
        field = f", field {error['field']}" if error.get("field") else ""
        code = f" (JSON-RPC {error['code']}{field})" if error.get("code") is not None else ""
        raise RenderqSubmitError(f"renderq refused: {error['message']}{code}")
    outcome["missing"] = missing
    return outcome


class RENDERQ_OT_submit(bpy.types.Operator):
    """Save, attach the scene's files and submit its frames to renderq"""

    bl_idname = "renderq.submit"
    bl_label = "Submit to renderq"

    def execute(self, context):
        scene = context.scene
        try:
            outcome = submit_scene(scene, scene.renderq)
        except RenderqSubmitError as e:
            self.report({"ERROR"}, str(e))
            return {"CANCELLED"}
        result = outcome["result"]
        chunks = len(result.get("message_ids", [])) if isinstance(result, dict) else 1
        self.report(
            {"INFO"},
            f"renderq: job {outcome['job_id']} ({chunks} chunks); uploaded {len(outcome['uploaded'])} "
            f"of {outcome['files']} files",
        )
        if not bpy.app.background:
            import webbrowser

            webbrowser.open(outcome["monitor"])
        return {"FINISHED"}


class RENDER_PT_renderq(bpy.types.Panel):
    bl_label = "renderq"
    bl_space_type = "PROPERTIES"
    bl_region_type = "WINDOW"
    bl_context = "output"

    def draw(self, context):
        layout = self.layout
        scene = context.scene
        settings = scene.renderq
        layout.use_property_split = True
        for prop in ("url", "token_env", "queue", "bucket", "bucket_url", "endpoint_url", "command"):
            layout.prop(settings, prop)
        row = layout.row()
        row.label(text=f"Scene frames {scene.frame_start}-{scene.frame_end}")
        layout.prop(settings, "frames")
        layout.prop(settings, "chunk_size")
        layout.prop(settings, "results_bucket")
        layout.prop(settings, "output_key")
        layout.prop(settings, "allow_missing")
        layout.operator(RENDERQ_OT_submit.bl_idname, icon="EXPORT")


def cli(argv):
    """``renderq-submit-blender``'s half inside Blender: the arguments after
    ``--``; writes the outcome (or ``{"error": ...}``) to ``--result``."""
    import argparse

    parser = argparse.ArgumentParser(prog="renderq-submit-blender (in Blender)")
    parser.add_argument("--result", required=True)
    parser.add_argument("--frames", default="")
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--allow-missing", action="store_true")
    for prop in ("url", "token_env", "queue", "bucket", "bucket_url", "endpoint_url", "command",
                 "results_bucket", "output_key"):
        parser.add_argument("--" + prop.replace("_", "-"), dest=prop, default=None)
    args = parser.parse_args(argv)
    scene = bpy.context.scene
    settings = scene.renderq
    for prop in ("url", "token_env", "queue", "bucket", "bucket_url", "endpoint_url", "command",
                 "results_bucket", "output_key", "frames"):
        value = getattr(args, prop)
        if value is not None:
            setattr(settings, prop, value)
    if args.chunk is not None:
        settings.chunk_size = args.chunk
    settings.allow_missing = args.allow_missing
    try:
        outcome = submit_scene(scene, settings)
    except RenderqSubmitError as e:
        outcome = {"error": str(e)}
    with open(args.result, "w") as f:
        json.dump(outcome, f)


CLASSES = (RenderqPreferences, RenderqSettings, RENDERQ_OT_submit, RENDER_PT_renderq)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.renderq = PointerProperty(type=RenderqSettings)


def unregister():
    del bpy.types.Scene.renderq
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)


if __name__ == "__main__" and "--" in sys.argv:
    cli(sys.argv[sys.argv.index("--") + 1:])
