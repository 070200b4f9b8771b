"""dmlkit's built-in plugins, registered through the ``dmlkit`` entry-point group like any other."""
