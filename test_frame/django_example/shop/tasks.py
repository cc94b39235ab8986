"""The work the web process hands to the consumer: a task_deco function and a seeds-style topic function."""

from funboost_like import BrokerEnum, task_deco


@task_deco("send_welcome_mail", broker_kind=BrokerEnum.DJANGO_ORM, qps=20)
def send_welcome_mail(user_id: int, language: str = "en") -> None:
    print(f"welcome mail to user {user_id} ({language})")


def build_report(message: dict) -> None:
    """As in django-mqs / django-task-mq: the function receives the message dict."""
    print(f"report {message['name']} for {message['month']}")
