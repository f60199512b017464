"""Head-node launcher for `ray submit cluster/aws.yaml cluster/tune.py -- --config ... --search ...`.

`ray submit` uploads this file to ~ and runs `python ~/tune.py ARGS` there, so it moves into the checkout that
file_mounts synced (recipe paths are relative to it) and hands ARGS to `bilevel-dist tune`.
"""

import os
import sys

from bilevel_dist.cli import main

if __name__ == "__main__":
    os.chdir(os.path.expanduser("~/bilevel_dist"))
    sys.exit(main(["tune", *sys.argv[1:]]))
