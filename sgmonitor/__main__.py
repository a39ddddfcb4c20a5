import sys

from sgmonitor.cli import main

sys.exit(main())
