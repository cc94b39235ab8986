"""A small Django project for the DJANGO_ORM tests (settings, URLs with the admin, task functions)."""
