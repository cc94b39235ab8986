"""The consumer process: ``python consumer.py`` beside manage.py; Ctrl-C stops it gracefully.

Run it as many times as you like, on as many hosts as reach the database: no message runs twice.
"""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_site.settings")
django.setup()

from shop.tasks import build_report, send_welcome_mail  # noqa: E402

from funboost_like.contrib.django import mq_consumer_thread  # noqa: E402

if __name__ == "__main__":
    send_welcome_mail.consume()  # in the background
    # the seeds' call: two threads for the topic "reports"; blocks until Ctrl-C or SIGTERM
    mq_consumer_thread(fun_topics=[{"fun": build_report, "topic": "reports"}], worker=2)
