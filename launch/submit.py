"""``python launch/submit.py submit|sweep|status|cancel ...``: same as ``tldist submit ...``."""
import sys
from tldist.cli.launch import main
sys.exit(main(sys.argv[1:]))
