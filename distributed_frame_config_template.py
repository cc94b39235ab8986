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

# ----- Redis (the Redis brokers and Redis-backed services: RPC results, filtering, status) -----

# REDIS_URL = "redis://127.0.0.1:6379/0"  # redis://[user:password@]host:port/db; the password is never logged
# REDIS_HEARTBEAT_SECONDS = 5.0  # REDIS_ACK_ABLE and RedisBrpopLpush consumers send a heartbeat this often
# REDIS_DEAD_AFTER_SECONDS = 15.0  # a consumer without heartbeat this long is dead: its messages run again

# ----- Logging -----

# LOG_CONSOLE = True  # attach a console handler (stderr) when the application configured no logging itself
# LOG_COLOR = True  # colour console lines by level (only on a terminal; the NO_COLOR env var turns it off)
# LOG_DIR = ""  # folder of the log files; "" means <per-user data dir>/logs (used when create_logger_file=True)

# ----- Consume loop -----

# GRACEFUL_STOP_SECONDS = 30.0  # after SIGINT/SIGTERM, how long running calls may take to finish
# THREAD_KEEP_ALIVE_SECONDS = 10.0  # an idle worker thread exits after this long
# STATS_LOG_INTERVAL_SECONDS = 60.0  # how often a consumer logs its rate and the estimated time left

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
