"""Push a model folder written by lsr-run's train stage to the Hugging Face Hub.

    python scripts/export.py outputs/runs/demo/<time>/model <user>/<name> [--private] [--revision main]

The folder is checked first (every tensor against its manifest), so what is pushed is the model that was trained.
It loads on the Hub side with ``sentence_transformers.SparseEncoder("<user>/<name>")``. Without a network (or with
HF_HUB_OFFLINE=1) the script says so in one line and exits with status 2; the folder stays as it was.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="model folder (<run dir>/model)")
    parser.add_argument("repo_id", help="Hub repository, <user or org>/<name>")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--message", default="Upload SPLADE model trained with lsr-run")
    args = parser.parse_args(argv)

    from lsr_run.errors import LsrError
    from lsr_run.models.persist import load_model

    try:
        load_model(args.model)
    except LsrError as e:
        print(f"lsr-run export: {e}", file=sys.stderr)
        return 2
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        print(f"lsr-run export: the Hugging Face Hub is offline here (HF_HUB_OFFLINE=1); nothing pushed. "
              f"{args.model} is ready to push from a machine with internet.", file=sys.stderr)
        return 2
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        info = api.upload_folder(folder_path=str(args.model), repo_id=args.repo_id, revision=args.revision,
                                 commit_message=args.message)
    except Exception as e:  # network, authentication, permission: one line, the folder untouched
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        print(f"lsr-run export: could not push {args.model} to {args.repo_id} ({type(e).__name__}: {reason}); "
              f"check the network and `huggingface-cli login`. Nothing was changed locally.", file=sys.stderr)
        return 2
    print(f"pushed {args.model} to {getattr(info, 'commit_url', args.repo_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
