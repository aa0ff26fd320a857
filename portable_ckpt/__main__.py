import sys

from portable_ckpt.cli import main

sys.exit(main())
