import sys

from bict_ray.cli import main

sys.exit(main())
