"""``python -m sparkml_mnist.cli``: the same entry point as the ``sparkml-mnist`` script."""

import sys

from sparkml_mnist.cli.commands import main

sys.exit(main())
