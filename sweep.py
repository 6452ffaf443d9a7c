"""Paper sweeps: `python sweep.py fig2|fig3|fig4|fig5|w2_mnist|w4_mnist [overrides] [--jobs N]`."""
import sys

from fprnn.tools.sweep import main

if __name__ == "__main__":
    sys.exit(main())
