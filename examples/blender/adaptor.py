#!/usr/bin/env python3
"""The renderq adaptor for Blender: a long-lived Blender that loads a scene
once and renders the frames of many jobs from it.

Blender writes its own banner and logs to standard output, which belongs to
the adaptor protocol. So this launcher keeps the protocol on two spare file
descriptors, points Blender's standard output at standard error, and
replaces itself with `blender -b --python adaptor_blender.py` (same process,
same process group, so renderq's cancel and kill reach Blender itself).

Run it as the adaptor program: `program = "python3"`,
`args = ["{config_dir}/examples/blender/adaptor.py"]`. `BLENDER` names the
Blender binary (default `blender`).
"""

import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
protocol_in, protocol_out = os.dup(0), os.dup(1)
os.set_inheritable(protocol_in, True)
os.set_inheritable(protocol_out, True)
devnull = os.open(os.devnull, os.O_RDONLY)
os.dup2(devnull, 0)
os.dup2(2, 1)
# Blender's own temporary folder goes in the adaptor's working folder, which
# renderq removes with the adaptor even when it has to kill it.
os.environ["TMPDIR"] = os.getcwd()
blender = os.environ.get("BLENDER", "blender")
os.execvp(blender, [
    blender, "-b", "--factory-startup",
    "--python", os.path.join(here, "adaptor_blender.py"),
    "--", str(protocol_in), str(protocol_out),
])
