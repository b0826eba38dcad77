"""``renderq-submit-blender scene.blend --frames 1-240 --chunk 4``: runs
Blender in the background with the renderq add-on, which saves, attaches
and submits the scene as "Submit to renderq" does.

The add-on ships inside this package (``renderq_client/blender_addon``);
Blender finds it through a throw-away ``BLENDER_USER_SCRIPTS`` folder, so
nothing needs installing in Blender first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Dict, List, Optional

from .rpc import Client

ADDON = "renderq_blender"


def addon_folder() -> str:
    """The add-on's source folder in this package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "blender_addon")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="renderq-submit-blender",
        description="Attach a .blend and the files it uses, and submit its frames to renderq as an array.",
    )
    p.add_argument("scene", help="the .blend")
    p.add_argument("--frames", default="", help="e.g. 1-240 (default: the scene's range)")
    p.add_argument("--chunk", type=int, default=4, help="frames per job (default 4)")
    p.add_argument("--url", default=os.environ.get("RENDERQ_URL", "http://127.0.0.1:8080/"))
    p.add_argument("--token-env", default="RENDERQ_TOKEN", help="the variable holding the token")
    p.add_argument("--queue", default=None)
    p.add_argument("--bucket", default="assets", help="the inputs bucket's name in workers.toml")
    p.add_argument("--bucket-url", required=True, help="s3://BUCKET, or the local bucket's folder")
    p.add_argument("--endpoint-url", default=None, help="an S3 endpoint other than AWS")
    p.add_argument("--command", default="blender_render")
    p.add_argument("--results-bucket", default=None)
    p.add_argument("--output-key", default=None)
    p.add_argument("--allow-missing", action="store_true", help="submit even when files are missing")
    p.add_argument("--blender", default=os.environ.get("BLENDER", "blender"))
    p.add_argument("--wait", action="store_true", help="wait for the frames, printing progress")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    if not os.path.isfile(args.scene):
        print(f"renderq-submit-blender: no such file: {args.scene}", file=sys.stderr)
        return 2
    if "://" not in args.bucket_url:
        # A local bucket's folder, named from here.
        args.bucket_url = os.path.abspath(os.path.expanduser(args.bucket_url))
    with tempfile.TemporaryDirectory(prefix="renderq-blender-") as tmp:
        os.makedirs(os.path.join(tmp, "scripts", "addons"))
        os.symlink(addon_folder(), os.path.join(tmp, "scripts", "addons", ADDON))
        result = os.path.join(tmp, "result.json")
        inner = ["--result", result, "--frames", args.frames, "--chunk", str(args.chunk)]
        for name in ("url", "token_env", "queue", "bucket", "bucket_url", "endpoint_url", "command",
                     "results_bucket", "output_key"):
            value = getattr(args, name)
            if value is not None:
                inner += ["--" + name.replace("_", "-"), value]
        if args.allow_missing:
            inner.append("--allow-missing")
        env = dict(os.environ, BLENDER_USER_SCRIPTS=os.path.join(tmp, "scripts"))
        # The client runs in this Python, wherever Blender's is.
        env.setdefault("RENDERQ_PYTHON", sys.executable)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        run = subprocess.run(
            [args.blender, "-b", "--factory-startup", "--addons", ADDON, os.path.abspath(args.scene),
             "--python-expr", f"import sys, {ADDON} as a; a.cli(sys.argv[sys.argv.index('--') + 1:])",
             "--", *inner],
            env=env,
            capture_output=True,
            text=True,
        )
        if not os.path.exists(result):
            print(f"renderq-submit-blender: Blender exited {run.returncode} without submitting:\n"
                  f"{(run.stdout + run.stderr).strip()[-2000:]}", file=sys.stderr)
            return 1
        with open(result) as f:
            outcome = json.load(f)
    if "error" in outcome:
        print(f"renderq-submit-blender: {outcome['error']}", file=sys.stderr)
        return 1
    print(json.dumps(outcome), flush=True)
    if not args.wait:
        return 0
    client = Client(args.url, token_env=args.token_env)

    def show(status: Dict[str, Any]) -> None:
        print(f"{status.get('succeeded', 0)}/{status.get('size', 0)} chunks done, "
              f"{status.get('running', 0)} running, {status.get('dead_lettered', 0)} dead-lettered", flush=True)

    final = client.wait(outcome["job_id"], progress=show)
    return 0 if final.get("succeeded") == final.get("size") else 1


if __name__ == "__main__":
    sys.exit(main())
