import sys

from pyro_elbo.cli import main

sys.exit(main())
