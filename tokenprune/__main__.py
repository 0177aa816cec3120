import sys

from tokenprune.cli import main

sys.exit(main())
