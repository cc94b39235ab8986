"""Features around the consume path, one module each (``base.py`` is their table; the hooks: ``core/calls.py``)."""
