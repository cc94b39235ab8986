"""Seeds-style consumer processes: ``python consumer_processes.py``; Ctrl-C stops them gracefully."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_site.settings")
django.setup()

from shop.tasks import build_report  # noqa: E402

from funboost_like.contrib.django import mq_consumer_process  # noqa: E402

if __name__ == "__main__":
    mq_consumer_process(fun_topics=[{"fun": build_report, "topic": "reports"}], worker=2)  # blocks
