"""Integrations with other frameworks (each imported only when used): ``funboost_like.contrib.django``."""
