"""`python -m fused_s2s demo | info | bench`."""
import sys

from .demo.cli import main

sys.exit(main())
