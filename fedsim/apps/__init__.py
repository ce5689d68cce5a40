"""The Flower ClientApp and ServerApp that every engine runs."""

from fedsim.apps.client import make_client_app
from fedsim.apps.server import make_server_app

__all__ = ["make_client_app", "make_server_app"]
