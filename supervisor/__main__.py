import sys

from .prometheus_env import prepare_multiproc_dir

prepare_multiproc_dir()  # before anything imports prometheus_client (see prometheus_env)

from .cli import main  # noqa: E402

sys.exit(main())
