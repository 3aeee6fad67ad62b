"""The built-in detector plugins, one per module, registered under the ``gfservice.detectors`` entry-point
group exactly like third-party plugins (installed as the ``gfservice_detectors`` package)."""
