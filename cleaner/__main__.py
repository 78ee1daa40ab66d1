import sys

from cleaner.main import main

sys.exit(main())
