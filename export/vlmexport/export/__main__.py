"""`python -m vlmexport.export`: see package.py."""

import sys

from vlmexport.export.package import main

sys.exit(main())
