import sys

from fourbit.cli import main

sys.exit(main())
