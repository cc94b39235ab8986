"""funboost_like settings for this project (``distributed_frame_config.py``).

``funboost_like init-config`` copied this file here; edit it freely. Every setting is listed below,
commented out, with its built-in default. Uncomment a line and change the value to override it.
Only the names listed here are read; anything else defined in this file is ignored.

Where a setting's value comes from, lowest precedence first:

1. the built-in default (the value shown on each line below);
2. this file, ``distributed_frame_config.py``, found as a module on ``sys.path`` (the folder of
   the script you start comes first there, so put it next to that script or at the project root);
3. environment variables named ``FUNBOOST_LIKE_<NAME>``, e.g. ``FUNBOOST_LIKE_REDIS_URL``
   (numbers are parsed as numbers; booleans accept 1/0, true/false, yes/no, on/off);
4. ``funboost_like.patch_frame_config(NAME=value)`` called from your code.

"<per-user data dir>" below means ``$XDG_DATA_HOME/funboost_like`` (by default
``~/.local/share/funboost_like``) on Linux, ``~/Library/Application Support/funboost_like`` on macOS
and ``%LOCALAPPDATA%\\funboost_like`` on Windows. Run ``funboost_like show-config`` to print the
effective settings (passwords are masked).
"""

# ----- Embedded SQLite broker (PERSISTQUEUE, the default broker) -----

# SQLITE_QUEUES_PATH = ""  # folder of the SQLite queue files; "" means <per-user data dir>/sqlite_queues
# SQLITE_LEASE_SECONDS = 15.0  # a killed consumer's unfinished messages are delivered again after this long
# SQLITE_BUSY_TIMEOUT_SECONDS = 5.0  # how long a write waits for another process's lock on the database
# SQLITE_SYNCHRONOUS = "NORMAL"  # "NORMAL" survives a process crash; "FULL" also survives a power loss
# SQLITE_FILES_PER_QUEUE = 1  # files each queue is spread over: fewer write-lock waits, more CPU per fetch
#                             # (docs/performance.md); MIDDLEWARE_NUM, the seed's name, sets it too

# ----- Redis (the Redis brokers and Redis-backed services: RPC results, filtering, status) -----

# REDIS_URL = "redis://127.0.0.1:6379/0"  # redis://[user:password@]host:port/db; the password is never logged
# REDIS_HEARTBEAT_SECONDS = 5.0  # REDIS_ACK_ABLE and RedisBrpopLpush consumers send a heartbeat this often
# REDIS_DEAD_AFTER_SECONDS = 15.0  # a consumer without heartbeat this long is dead: its messages run again

# ----- RabbitMQ (RABBITMQ_PIKA, RABBITMQ_AMQPSTORM, RABBITMQ_RABBITPY) and kombu (KOMBU) -----
# RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"  # change guest before listening beyond localhost
# KOMBU_URL = ""  # any kombu URL; "" means RABBITMQ_URL

# ----- SQL databases through SQLAlchemy 2 (SQLACHEMY): PostgreSQL, MySQL/MariaDB, SQLite, ... -----

# SQLALCHEMY_URL = ""  # e.g. "postgresql+psycopg://user:password@host/db"; "" means a SQLite file
#                      # sqlalchemy_queues.sqlite3 in SQLITE_QUEUES_PATH; the password is never logged
#                      # (SQLACHEMY_ENGINE_URL, the seed's spelling, is read as this setting too)
# SQLALCHEMY_LEASE_SECONDS = 15.0  # a killed consumer's unfinished messages are delivered again after this long

# ----- NATS with JetStream (NATS) -----

# NATS_URL = "nats://127.0.0.1:4222"  # nats://[user:password@]host:port[,nats://...]; the password is never logged
# NATS_ACK_WAIT_SECONDS = 30.0  # a killed consumer's unfinished messages are delivered again after this long

# ----- Kafka (KAFKA with kafka-python, CONFLUENT_KAFKA with confluent-kafka; docs/kafka.md) -----

# KAFKA_BOOTSTRAP_SERVERS = "127.0.0.1:9092"  # host:port[,host:port...]
# KAFKA_PARTITIONS = 4  # partitions of a topic funboost_like creates; publishers use at most this many
# KAFKA_SESSION_TIMEOUT_SECONDS = 10.0  # a killed consumer's partitions move to the others after this long
# KAFKA_ORDERED_QUEUES = ""  # comma-separated queues that run one call at a time per partition
# KAFKA_SECURITY_PROTOCOL = "PLAINTEXT"  # PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL
# KAFKA_SASL_MECHANISM = "PLAIN"  # with SASL_*: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512
# KAFKA_SASL_USERNAME = ""  # with SASL_*
# KAFKA_SASL_PASSWORD = ""  # never logged
# KAFKA_API_VERSION = ""  # kafka-python only: "" asks the server; "2.0" where its answer cannot be read
# KAFKA_BOOTSTRAP_TIMEOUT_SECONDS = 10.0  # kafka-python only: a new client's wait for its first contact

# ----- Apache Pulsar (PULSAR; docs/pulsar.md): tested on pulsar-lite only -----

# PULSAR_URL = "pulsar://127.0.0.1:6650"  # pulsar://host:port or pulsar+ssl://host:port; never logged unredacted
# PULSAR_NAMESPACE = "public/default"  # tenant/namespace of the queues' topics

# ----- MQTT (MQTT; docs/mqtt.md): an MQTT 5 server with shared subscriptions (Mosquitto 2: max_queued_messages 0) -----

# MQTT_URL = "mqtt://127.0.0.1:1883"  # mqtt://[user:password@]host[:port] (mqtts:// for TLS); password never logged
# MQTT_SESSION_EXPIRY_SECONDS = 604800.0  # how long the server keeps a queue's session (its messages) with nobody on it
# MQTT_RECEIVE_MAXIMUM = 1000  # messages the server may send one consumer process before its acks

# ----- NSQ (NSQ; docs/nsq.md): nsqd, tested against a protocol fixture only -----

# NSQD_TCP_ADDRESSES = "127.0.0.1:4150"  # host:port[,host:port...]: consumers read every nsqd, publishers one
# NSQD_HTTP_ADDRESSES = "127.0.0.1:4151"  # the HTTP address of each nsqd above, same order (count, purge, dead letters)
# NSQ_MSG_TIMEOUT_SECONDS = 60.0  # a killed consumer's unfinished messages are delivered again after this long

# ----- MongoDB (MONGOMQ; docs/mongo.md) -----

# MONGO_URL = "mongodb://127.0.0.1:27017/funboost_like"  # mongodb://[user:password@]host:port/database[?options];
#                                                      # the URL's database is used ("funboost_like" when none);
#                                                      # the password is never logged
# MONGO_LEASE_SECONDS = 15.0  # a killed consumer's unfinished messages are delivered again after this long

# ----- ZeroMQ (ZEROMQ; docs/zeromq.md): no server; a queue's name is the TCP port of its hub -----

# ZEROMQ_HOST = "127.0.0.1"  # where the hubs are reached; on a loopback address a missing hub is started
# ZEROMQ_BIND_HOST = "127.0.0.1"  # the address a started hub binds; "0.0.0.0" lets other hosts publish
# ZEROMQ_PORT = 0  # the hub port of queues whose names are not port numbers (0: such names are refused)
# ZEROMQ_TIMEOUT_SECONDS = 5.0  # how long a request waits for its hub's answer
# ZEROMQ_HUB_IDLE_SECONDS = 600.0  # a started hub exits after this long without requests while its queues are empty

# ----- HTTPSQS (HTTPSQS; docs/httpsqs.md): httpsqs 1.7, at-most-once -----

# HTTPSQS_URL = "http://127.0.0.1:1218/"  # http://host:port/?auth=PASSWORD; the password is never logged
# HTTPSQS_TIMEOUT_SECONDS = 5.0  # how long one request waits for the server's answer
# HTTPSQS_PIPELINE = 100  # requests in flight on one connection (publish_many, batch fetches); 1: no pipelining

# ----- The Django ORM queue (DJANGO_ORM; funboost_like.contrib.django in INSTALLED_APPS, docs/django.md) -----

# DJANGO_SETTINGS_MODULE = ""  # e.g. "mysite.settings": Django is set up with it when the process has not done
#                              # so itself; "" means the DJANGO_SETTINGS_MODULE environment variable
# DJANGO_DATABASE_ALIAS = ""  # the database of the queue tables; "" means the Django setting
#                             # FUNBOOST_LIKE_DATABASE, else "default"
# DJANGO_LEASE_SECONDS = 15.0  # a killed consumer's unfinished messages are delivered again after this long
# DJANGO_MIGRATE_ON_FIRST_USE = False  # True: apply the app's migrations when its tables are missing
#                                      # (scripts without manage.py); else run: python manage.py migrate

# ----- Logging -----

# LOG_CONSOLE = True  # attach a console handler (stderr) when the application configured no logging itself
# LOG_COLOR = True  # colour console lines by level (only on a terminal; the NO_COLOR env var turns it off)
# LOG_DIR = ""  # folder of the log files; "" means <per-user data dir>/logs (used when create_logger_file=True)

# ----- Consume loop -----

# GRACEFUL_STOP_SECONDS = 30.0  # after SIGINT/SIGTERM, how long running calls may take to finish
# THREAD_KEEP_ALIVE_SECONDS = 10.0  # an idle worker thread exits after this long
# STATS_LOG_INTERVAL_SECONDS = 60.0  # how often a consumer logs its rate and the estimated time left (0: never)

# ----- Operations: registry and run-time control (docs/operations.md) -----

# OPS_REGISTRY = True  # consumers register and beat, publishers note their queues; False turns it all off
# CONSUMER_HEARTBEAT_SECONDS = 5.0  # is_send_consumer_hearbeat_to_redis=True: a beat to REDIS_URL this often
# OPS_HEARTBEAT_SECONDS = 2.0  # a consumer's record is rewritten this often; stale after 3 beats, gone after 10
# OPS_STORE_BROKER = ""  # e.g. "REDIS": kinds without key-value records (Kafka, Pulsar, ...) keep their registry there

# ----- Prometheus metrics and OpenTelemetry spans (docs/metrics.md) -----

# METRICS = False  # True: publishers and consumers count for Prometheus (per-process snapshots in METRICS_DIR)
# METRICS_DIR = ""  # folder of the processes' snapshots, one per host; "" means <per-user data dir>/metrics
# METRICS_FLUSH_SECONDS = 1.0  # how often a process writes its snapshot (> 0; METRICS = False is off)
# METRICS_PORT = 0  # > 0: a consumer's process serves /metrics on this port; 0: none (`funboost_like metrics`)
# METRICS_HOST = "127.0.0.1"  # the address that endpoint binds
# OPENTELEMETRY_TRACING = True  # spans when opentelemetry-api is installed and an SDK is configured; False: never

# ----- Processes (run_consumer_with_multi_process, multi_process_consume) -----

# MULTI_PROCESS_START_METHOD = ""  # "fork", "spawn" or "forkserver"; "" means the platform's default

# ----- Timing jobs (fsdf_background_scheduler) -----

# SCHEDULER_JOB_STORE = "memory"  # where jobs live: "memory", "sqlite" or "redis" (at REDIS_URL), as JSON
# SCHEDULER_SQLITE_DIR = ""  # folder of jobs.sqlite3 and fire_locks.sqlite3; "" means <per-user data dir>/scheduler
# SCHEDULER_FIRE_LOCK = "auto"  # "auto" (redis with a redis job store, else sqlite), "sqlite", "redis" or "none"
# SCHEDULER_FIRE_LOCK_RETENTION_SECONDS = 86400.0  # how long a published fire time is remembered
# SCHEDULER_POLL_SECONDS = 1.0  # how often a scheduler on a shared job store looks for jobs changed elsewhere

# ----- Results, status and time -----

# RPC_TIMEOUT_SECONDS = 120.0  # how long AsyncResult.result waits for a result by default
# RPC_RESULT_EXPIRE_SECONDS = 3600.0  # how long a call's result is kept for the publisher to fetch
# STATUS_DB_PATH = ""  # folder of the call-status databases; "" means <per-user data dir>/status
# TIMEZONE = ""  # IANA zone (e.g. "Asia/Shanghai") for naive eta datetimes and time windows; "" = local time
