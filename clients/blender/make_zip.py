#!/usr/bin/env python3
"""Writes renderq_blender.zip, the add-on as Blender's preferences install
it (Edit > Preferences > Add-ons > Install...).

    python3 clients/blender/make_zip.py [OUT.zip]
"""

import os
import sys
import zipfile

here = os.path.dirname(os.path.abspath(__file__))
out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.getcwd(), "renderq_blender.zip")
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    folder = os.path.join(here, "renderq_blender")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            z.write(os.path.join(folder, name), f"renderq_blender/{name}")
print(out)
