"""`python -m keras_taylor ...` runs the `keras-taylor` command line tool."""

import sys

from keras_taylor.cli import main

if __name__ == "__main__":
    sys.exit(main())
