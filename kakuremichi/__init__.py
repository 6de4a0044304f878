"""kakuremichi's top floor: the ``kakuremichi`` command line (control, gateway, agent,
admin, demo), the one-machine demo and its sample app."""

from common import __version__

__all__ = ["__version__"]
