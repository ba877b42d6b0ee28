"""``accelerate launch launch/train.py CONFIG [overrides]``: ``tldist train --stop-on-signal``."""
import sys
from tldist.cli.main import main
sys.exit(main(["train", "--stop-on-signal", *sys.argv[1:]]))
