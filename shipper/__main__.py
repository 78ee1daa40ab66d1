import sys

from shipper.main import main

sys.exit(main())
