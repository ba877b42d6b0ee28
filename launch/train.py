"""``accelerate launch launch/train.py CONFIG [overrides]``: ``tldist train`` + checkpoint-on-signal."""
import sys
from tldist.launch.worker import main
sys.exit(main(sys.argv[1:]))
