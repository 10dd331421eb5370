import sys

from lightning_tune.cli import main

sys.exit(main())
