import sys

from processor.main import main

sys.exit(main())
