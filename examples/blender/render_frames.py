"""Renders frames of the open scene, inside Blender: the one-shot renderq
`process` command for Blender.

    blender -b --factory-startup SCENE.blend --python render_frames.py -- \
        --frames 1,2,3 --frame 1 --out WORKDIR/frame_

Writes OUT0001.png for frame 1, and so on. After each frame it prints
`openjd_progress: P` (renderq turns those into progress events). `--frames`
is an array chunk's frames; without it, `--frame` alone is rendered.
"""

import argparse
import sys

import bpy

argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
parser = argparse.ArgumentParser(prog="render_frames.py")
parser.add_argument("--frames", default="")
parser.add_argument("--frame", type=int, default=1)
parser.add_argument("--out", required=True)
args = parser.parse_args(argv)

frames = [int(f) for f in args.frames.split(",") if f.strip()] or [args.frame]
scene = bpy.context.scene
scene.render.image_settings.file_format = "PNG"
for done, frame in enumerate(frames, start=1):
    scene.frame_set(frame)
    scene.render.filepath = f"{args.out}{frame:04d}.png"
    print(f"openjd_status: rendering frame {frame}", flush=True)
    bpy.ops.render.render(write_still=True)
    print(f"openjd_progress: {100.0 * done / len(frames):.1f}", flush=True)
