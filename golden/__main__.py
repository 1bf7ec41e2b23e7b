"""`python -m golden [--e2e] GOLDEN_DIR OUT_DIR …`: see `golden.harness`."""

import sys

from golden.harness import main

sys.exit(main())
