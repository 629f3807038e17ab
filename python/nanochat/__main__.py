import sys

from nanochat.cli import main

sys.exit(main())
