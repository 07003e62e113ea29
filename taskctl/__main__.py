import sys

from taskctl.cli import main

sys.exit(main())
