"""``python -m opd_train.serving --model DIR --port P``: run the SGLang-protocol CPU engine."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
