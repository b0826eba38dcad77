#!/usr/bin/env python3
"""A `process` command for renderq that prints its arguments as JSON.

Handy for checking how a command's `args` templates render: every template
becomes exactly one argument, passed literally (renderq never uses a shell).
"""

import json
import os
import sys

print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "env": sorted(os.environ)}))
