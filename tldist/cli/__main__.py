"""``python -m tldist.cli ...`` (and ``accelerate launch -m tldist.cli ...``): the ``tldist`` command."""

import sys

from tldist.cli.main import main

sys.exit(main())
