"""``python -m renderq_client submit-files SPEC.json``: see
:mod:`renderq_client.submit_files`. Prints one JSON object: the outcome, or
``{"error": {"code", "message", "field"}}`` (exit status 1)."""

from __future__ import annotations

import json
import sys
from typing import List, Optional

from .rpc import RenderqError
from .submit_files import submit_files


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "submit-files":
        print("usage: python -m renderq_client submit-files SPEC.json", file=sys.stderr)
        return 2
    with open(args[1]) as f:
        spec = json.load(f)
    try:
        outcome = submit_files(spec)
    except RenderqError as e:
        print(json.dumps({"error": {"code": e.code, "message": e.message, "field": e.field}}))
        return 1
    except Exception as e:  # an upload's error (boto3, the disk): its words
        print(json.dumps({"error": {"code": None, "message": f"{type(e).__name__}: {e}", "field": None}}))
        return 1
    print(json.dumps(outcome))
    return 0


if __name__ == "__main__":
    sys.exit(main())
