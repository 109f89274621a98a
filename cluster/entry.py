"""Entry script for ``ray submit cluster/<file>.yaml cluster/entry.py ARGS``: runs
``rl-agnostic ARGS`` on the head node against the running cluster (``ray submit`` copies this
file to the head and runs it there; ``RAY_ADDRESS=auto`` makes the trainers join the cluster
instead of starting a local Ray)."""

import os
import sys

from rl_agnostic.cli import main

if __name__ == "__main__":
    os.environ.setdefault("RAY_ADDRESS", "auto")
    repo = os.path.expanduser("~/rl_agnostic")  # where cluster/aws-gpu.yaml mounts the repo
    if os.path.isdir(repo):  # relative config paths (tune_configs/...) resolve from there
        os.chdir(repo)
    sys.exit(main(sys.argv[1:]))
