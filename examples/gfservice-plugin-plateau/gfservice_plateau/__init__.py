"""An example third-party gfservice detector plugin: ``plateau`` (see :mod:`gfservice_plateau.plateau`)."""

from gfservice_plateau.plateau import Plateau

__all__ = ["Plateau"]
