"""The `keras-taylor` console script.

It loads `keras_taylor/cli.py` (which imports only the standard library at
import time) without importing the `keras_taylor` package first, so that
`keras-taylor --help` and usage errors answer at once, without importing
Keras and TensorFlow. Every command then imports the package as usual.
"""

import importlib.util
import os
import sys


def main():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    spec = importlib.util.find_spec("keras_taylor")  # finds it; does not import it
    if spec is None or not spec.submodule_search_locations:
        print("keras-taylor: error: the keras_taylor package is not installed", file=sys.stderr)
        return 2
    path = os.path.join(list(spec.submodule_search_locations)[0], "cli.py")
    cli_spec = importlib.util.spec_from_file_location("_keras_taylor_cli", path)
    cli = importlib.util.module_from_spec(cli_spec)
    cli_spec.loader.exec_module(cli)
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())
