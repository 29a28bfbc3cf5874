# tasknet node entry point: `python node.py --help`. Stays thin: the command line, the
# options and the node itself live in the tasknet_node package.
import sys

from tasknet_node.cli import main

if __name__ == "__main__":
    sys.exit(main())
