"""``python -m tldist.launch submit|sweep|status|cancel ...``."""

import sys

from tldist.launch.cli import main

sys.exit(main())
