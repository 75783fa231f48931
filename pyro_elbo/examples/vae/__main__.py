"""``python -m pyro_elbo.examples.vae``: the command line of :func:`main`."""

import sys

from pyro_elbo.examples.vae.cli import main

sys.exit(main())
