#!/usr/bin/env python3
"""The pipeline example's composite stage, one frame at a time: grades a
rendered frame with ffmpeg (saturation, contrast and a vignette) and writes
it beside the job. A renderq `process` command:

    composite.py --src RESULTS/renders/RENDER_JOB --frames 3,4 --frame 3 \
        --out WORKDIR/comp_

reads SRC/3.png (the render stage's upload of frame 3) and writes
OUT0003.png. A frame the render stage never wrote fails the job, naming it.
"""

import argparse
import os
import subprocess
import sys

parser = argparse.ArgumentParser(prog="composite.py")
parser.add_argument("--src", required=True)
parser.add_argument("--frames", default="")
parser.add_argument("--frame", type=int, default=1)
parser.add_argument("--out", required=True)
args = parser.parse_args()

frames = [int(f) for f in args.frames.split(",") if f.strip()] or [args.frame]
for done, frame in enumerate(frames, start=1):
    source = os.path.join(args.src, f"{frame}.png")
    if not os.path.isfile(source):
        print(f"openjd_fail: render of frame {frame} not found at {source}", flush=True)
        sys.exit(1)
    print(f"openjd_status: compositing frame {frame}", flush=True)
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", source,
         "-vf", "eq=saturation=1.4:contrast=1.1,vignette",
         f"{args.out}{frame:04d}.png"],
        check=True,
    )
    print(f"openjd_progress: {100.0 * done / len(frames):.1f}", flush=True)
