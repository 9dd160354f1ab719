import sys

from meshbake.compiler.cli import main

sys.exit(main())
