"""An example third-party gfservice detector plugin: ``underflow`` (see :mod:`gfservice_underflow.underflow`)."""

from gfservice_underflow.underflow import Underflow

__all__ = ["Underflow"]
