import sys

from rqgen.cli import main

sys.exit(main())
