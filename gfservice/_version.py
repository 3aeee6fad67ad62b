"""The version of gfservice, defined once: ``pyproject.toml`` reads it (``[tool.setuptools.dynamic]``), the package
face, the command line, the exporter's ``gradflow_build_info`` and the service's status import it from here.

>>> __version__.count(".") >= 2
True
"""

__version__ = "0.1.0"
