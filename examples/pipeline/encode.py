#!/usr/bin/env python3
"""The pipeline example's encode stage: every composited frame of a shot
into one H.264 MP4 with ffmpeg. A renderq `process` command:

    encode.py --src RESULTS/comps/COMP_JOB --fps 24 --out WORKDIR/shot.mp4

reads SRC/N.png (the composite stage's uploads, numbered by frame) in
frame order; frames must be consecutive (a gap fails the job, naming it).
"""

import argparse
import os
import re
import subprocess
import sys

parser = argparse.ArgumentParser(prog="encode.py")
parser.add_argument("--src", required=True)
parser.add_argument("--fps", type=int, default=24)
parser.add_argument("--out", required=True)
args = parser.parse_args()

frames = sorted(
    int(m.group(1))
    for name in (os.listdir(args.src) if os.path.isdir(args.src) else [])
    if (m := re.fullmatch(r"(\d+)\.png", name))
)
if not frames:
    print(f"openjd_fail: no composited frames in {args.src}", flush=True)
    sys.exit(1)
missing = sorted(set(range(frames[0], frames[-1] + 1)) - set(frames))
if missing:
    print(f"openjd_fail: frames {missing} are missing from {args.src}", flush=True)
    sys.exit(1)
print(f"openjd_status: encoding {len(frames)} frames", flush=True)
subprocess.run(
    ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
     "-framerate", str(args.fps), "-start_number", str(frames[0]),
     "-i", os.path.join(args.src, "%d.png"),
     "-frames:v", str(len(frames)),
     "-c:v", "libx264", "-pix_fmt", "yuv420p", args.out],
    check=True,
)
print("openjd_progress: 100", flush=True)
