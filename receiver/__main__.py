import sys

from receiver.main import main

sys.exit(main())
