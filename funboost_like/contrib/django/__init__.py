"""``funboost_like.contrib.django``: the Django app of the DJANGO_ORM broker, and the seeds' queue calls.

Add ``"funboost_like.contrib.django"`` to ``INSTALLED_APPS`` and run ``python manage.py migrate``:
the queues live in the app's tables on the project's database, the admin shows them (queues,
messages by topic and state, dead letters with their reasons, requeue and delete actions), and
``@task_deco(..., broker_kind=BrokerEnum.DJANGO_ORM)`` or the calls below use them. See docs/django.md.

Importing this package loads no model (Django imports it while setting up).
"""

from funboost_like.contrib.django.queues import (
    mq_consumer,
    mq_consumer_process,
    mq_consumer_thread,
    mq_init,
    mq_producer,
)

__all__ = ["mq_consumer", "mq_consumer_process", "mq_consumer_thread", "mq_init", "mq_producer"]
