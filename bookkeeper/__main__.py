import sys

from bookkeeper.main import main

sys.exit(main())
