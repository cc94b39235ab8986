"""funboost settings for the peer benchmark (read only inside the scratch virtualenv).

funboost imports a module named ``funboost_config`` from ``sys.path`` and, when there is none, copies
its template into ``sys.path[1]``; ``benchmarks/peers/run.py`` puts this folder first on
``PYTHONPATH``. Redis host, port and database come from ``PEERBENCH_REDIS_HOST``,
``PEERBENCH_REDIS_PORT`` and ``PEERBENCH_REDIS_DB`` (default 127.0.0.1:6379, db 13), the SQLite queue
folder from ``PEERBENCH_TMP``, RabbitMQ (``RABBITMQ_AMQPSTORM``) from ``PEERBENCH_RABBITMQ_USER``,
``PEERBENCH_RABBITMQ_PASS``, ``PEERBENCH_RABBITMQ_HOST``, ``PEERBENCH_RABBITMQ_PORT`` and
``PEERBENCH_RABBITMQ_VHOST`` (default guest:guest at 127.0.0.1:5672, vhost ``/``), the SQLACHEMY database from
``PEERBENCH_SQLA_URL``; the kafka, nats, mongo, pulsar and kombu sets' servers from ``PEERBENCH_KAFKA_SERVERS``
(``host:port[,host:port]``), ``PEERBENCH_NATS_URL``, ``PEERBENCH_MONGO_URL``, ``PEERBENCH_PULSAR_URL`` and
``PEERBENCH_KOMBU_URL`` (``benchmarks/peers/run.py`` sets them). funboost's AmqpStorm
publisher builds its own URI from the five ``RABBITMQ_*`` values (``amqp://user:pass@host:port/vhost``,
so vhost ``/`` gives the path ``//``, which AmqpStorm reads as ``/``); ``RABBITMQ_URL`` is set the same
way for the other funboost RabbitMQ kinds. The start-up prompts and the thread-pool messages are
logged at WARNING so that they are not shown.
"""

import logging
import os
from urllib.parse import quote_plus

from funboost.utils.simple_data_class import DataClassBase


class BrokerConnConfig(DataClassBase):
    REDIS_HOST = os.environ.get("PEERBENCH_REDIS_HOST", "127.0.0.1")
    REDIS_USERNAME = ""
    REDIS_PASSWORD = ""
    REDIS_PORT = int(os.environ.get("PEERBENCH_REDIS_PORT", "6379"))
    REDIS_DB = int(os.environ.get("PEERBENCH_REDIS_DB", "13"))
    REDIS_DB_FILTER_AND_RPC_RESULT = REDIS_DB
    REDIS_SSL = False
    REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
    SQLLITE_QUEUES_PATH = os.path.join(os.environ.get("PEERBENCH_TMP", "/tmp"), "funboost_sqlite_queues")  # (sic)
    RABBITMQ_USER = os.environ.get("PEERBENCH_RABBITMQ_USER", "guest")
    RABBITMQ_PASS = os.environ.get("PEERBENCH_RABBITMQ_PASS", "guest")
    RABBITMQ_HOST = os.environ.get("PEERBENCH_RABBITMQ_HOST", "127.0.0.1")
    RABBITMQ_PORT = int(os.environ.get("PEERBENCH_RABBITMQ_PORT", "5672"))
    RABBITMQ_VIRTUAL_HOST = os.environ.get("PEERBENCH_RABBITMQ_VHOST", "/")
    RABBITMQ_URL = (f"amqp://{RABBITMQ_USER}:{quote_plus(RABBITMQ_PASS)}@{RABBITMQ_HOST}:{RABBITMQ_PORT}/"
                    f"{RABBITMQ_VIRTUAL_HOST}")
    # SQLACHEMY: the database of the sql set (benchmarks/peers/run.py --set sql), PostgreSQL by default
    SQLACHEMY_ENGINE_URL = os.environ.get("PEERBENCH_SQLA_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    # KAFKA (kafka-python) and KAFKA_CONFLUENT (confluent-kafka): the kafka set's stand-in (Tansu)
    KAFKA_BOOTSTRAP_SERVERS = os.environ.get("PEERBENCH_KAFKA_SERVERS", "127.0.0.1:19092").split(",")
    NATS_URL = os.environ.get("PEERBENCH_NATS_URL", "nats://127.0.0.1:4222")
    # MONGOMQ: SecantusDB of the mongo set; no retryable writes (each one slows SecantusDB's later writes)
    MONGO_CONNECT_URL = os.environ.get("PEERBENCH_MONGO_URL", "mongodb://127.0.0.1:27217/?retryWrites=false")
    PULSAR_URL = os.environ.get("PEERBENCH_PULSAR_URL", "pulsar://127.0.0.1:16650")
    KOMBU_URL = os.environ.get("PEERBENCH_KOMBU_URL", REDIS_URL)


class FunboostCommonConfig(DataClassBase):
    NB_LOG_FORMATER_INDEX_FOR_CONSUMER_AND_PUBLISHER = logging.Formatter(
        "%(asctime)s - %(name)s - %(levelname)s - %(message)s", "%Y-%m-%d %H:%M:%S")
    TIMEZONE = "UTC"
    SHOW_HOW_FUNBOOST_CONFIG_SETTINGS = False
    FUNBOOST_PROMPT_LOG_LEVEL = logging.WARNING
    KEEPALIVETIMETHREAD_LOG_LEVEL = logging.WARNING
