from django.http import JsonResponse

from funboost_like.contrib.django import mq_producer

from .tasks import send_welcome_mail


def signup(request):
    send_welcome_mail.push(user_id=42)
    mq_producer(topic="reports", message={"name": "sales", "month": "2024-05"}, priority=5)
    return JsonResponse({"queued": 2})
