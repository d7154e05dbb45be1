import sys

from fourbit.cli import main

if __name__ == "__main__":  # not when a process `fourbit train --nproc N` started imports it
    sys.exit(main())
