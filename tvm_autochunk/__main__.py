"""``python -m tvm_autochunk``: the command line (see ``tvm_autochunk.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m tvm_autochunk"))
