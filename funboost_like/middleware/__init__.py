"""Features around the consume path, one module each (see ``base.py`` for the hooks)."""
