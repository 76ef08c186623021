"""`python -m devcluster up DIR` / `down DIR` (see `make run`)."""

import sys

from devcluster.cluster import main

sys.exit(main(sys.argv[1:]))
