"""The app's configuration: label ``funboost_like_django``, tables ``funboost_like_*``."""

from __future__ import annotations

from django.apps import AppConfig


class FunboostLikeDjangoConfig(AppConfig):
    name = "funboost_like.contrib.django"
    label = "funboost_like_django"
    verbose_name = "funboost_like queues"
    default_auto_field = "django.db.models.BigAutoField"
