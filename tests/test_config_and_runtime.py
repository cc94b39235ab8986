"""Settings precedence, decoration-time validation, pool shrinking and the consumer's rate log."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from funboost_like import (
    BrokerEnum,
    ConfigurationError,
    FunctionResultStatusPersistanceConfig,
    patch_frame_config,
    task_deco,
)
from funboost_like.brokers.memory import MemoryBroker
from funboost_like.brokers.registry import get_broker
from funboost_like.core.config import settings

from .conftest import REPO


def test_precedence_defaults_file_env_patch(tmp_path: Path) -> None:
    (tmp_path / "distributed_frame_config.py").write_text(
        "SQLITE_LEASE_SECONDS = 7.0\nREDIS_URL = 'redis://from-file:1/0'\nGRACEFUL_STOP_SECONDS = 9.0\n"
    )
    script = (
        "from funboost_like.core.config import settings, patch_frame_config\n"
        "names = ('SQLITE_LEASE_SECONDS', 'REDIS_URL', 'GRACEFUL_STOP_SECONDS', 'STATS_LOG_INTERVAL_SECONDS')\n"
        "before = tuple(settings.get(name) for name in names)\n"
        "patch_frame_config(GRACEFUL_STOP_SECONDS=1.5)\n"
        "print(before, settings.get('GRACEFUL_STOP_SECONDS'))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNBOOST_LIKE_")}
    env["PYTHONPATH"] = str(REPO)
    env["FUNBOOST_LIKE_REDIS_URL"] = "redis://from-env:2/0"
    env["FUNBOOST_LIKE_GRACEFUL_STOP_SECONDS"] = "4"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    # file beats default; env beats file; patch beats env; untouched settings keep their default
    assert out.stdout.strip() == "(7.0, 'redis://from-env:2/0', 4.0, 60.0) 1.5"


def test_bad_settings_raise() -> None:
    with pytest.raises(ConfigurationError, match="unknown setting"):
        patch_frame_config(SQLITE_LEASE_SECOND=3)
    os.environ["FUNBOOST_LIKE_SQLITE_LEASE_SECONDS"] = "soon"
    try:
        settings.reset()
        with pytest.raises(ConfigurationError, match="not a valid float"):
            settings.get("SQLITE_LEASE_SECONDS")
    finally:
        del os.environ["FUNBOOST_LIKE_SQLITE_LEASE_SECONDS"]
        settings.reset()


def assert_refused_both_ways(name: str, value: float, given: str, from_environment: str) -> None:
    """``value`` for setting ``name`` raises through patch_frame_config (message matching ``name=`` +
    ``given``) and through its environment variable (``FUNBOOST_LIKE_<name>) `` + ``from_environment``)."""
    with pytest.raises(ConfigurationError, match=f"{name}={given}"):
        patch_frame_config(**{name: value})
    os.environ[f"FUNBOOST_LIKE_{name}"] = str(value)
    try:
        settings.reset()
        with pytest.raises(ConfigurationError, match=f"FUNBOOST_LIKE_{name}\\) {from_environment}"):
            settings.get(name)
    finally:
        del os.environ[f"FUNBOOST_LIKE_{name}"]
        settings.reset()


@pytest.mark.parametrize(("name", "value"), [
    ("SQLITE_LEASE_SECONDS", 0), ("SQLITE_LEASE_SECONDS", -1), ("SQLITE_LEASE_SECONDS", float("nan")),
    ("THREAD_KEEP_ALIVE_SECONDS", -1), ("GRACEFUL_STOP_SECONDS", float("inf")), ("KAFKA_PARTITIONS", 0),
])
def test_a_number_setting_out_of_range_raises_when_given(name: str, value: float) -> None:
    """A lease of 0 was taken: the consumer then logged its error every second and never consumed; a
    negative keep-alive crashed worker threads."""
    assert_refused_both_ways(name, value, ".*must be a finite number", "must be a finite number")
    patch_frame_config(GRACEFUL_STOP_SECONDS=0, ZEROMQ_PORT=0)  # 0 where 0 means something


@pytest.mark.parametrize("name", ["KAFKA_SESSION_TIMEOUT_SECONDS", "ZEROMQ_TIMEOUT_SECONDS", "HTTPSQS_TIMEOUT_SECONDS",
                                  "RPC_RESULT_EXPIRE_SECONDS", "CONSUMER_HEARTBEAT_SECONDS", "OPS_HEARTBEAT_SECONDS",
                                  "MQTT_SESSION_EXPIRY_SECONDS", "METRICS_FLUSH_SECONDS"],
                         ids=lambda name: name.replace("HTTPSQS", "HTTP-SQS"))  # not the id that starts its fixture
def test_a_setting_that_cannot_be_0_raises_when_given_0(name: str) -> None:
    """0 was taken, and failed later, again and again: a Kafka consumer retried its fetch forever
    ("Kafka ... is unreachable": an invalid session timeout), every ZeroMQ or HTTPSQS request timed out
    at once, every RPC result was dropped with an ERROR (a store's ttl must be > 0) so its publisher
    timed out; a registry heartbeat of 0 rewrote each worker record 20 times a second
    (docs/configuration.md: heartbeats must be more than 0); an MQTT session expiry of 0 let the server
    drop a queue's session, and the messages in it, whenever no consumer was connected; a metrics flush
    interval of 0 wrote the snapshot every 0.25 s (`METRICS=False` is the off switch)."""
    assert_refused_both_ways(name, 0, "0.0 .*must be a finite number, more than 0",
                             "must be a finite number, more than 0")
    patch_frame_config(**{name: 0.5})


def test_settings_in_code_or_in_the_config_file_are_checked_when_given(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="did you mean SQLITE_LEASE_SECONDS"):
        patch_frame_config(SQLITE_LEASE_SECOND=3)
    with pytest.raises(ConfigurationError, match=r"LEASE_SECONDS='abc' \(from patch_frame_config\) must be a number"):
        patch_frame_config(SQLITE_LEASE_SECONDS="abc")
    with pytest.raises(ConfigurationError, match="LOG_CONSOLE='no' .* must be True or False"):
        patch_frame_config(LOG_CONSOLE="no")
    with pytest.raises(ConfigurationError, match=r"SQLITE_FILES_PER_QUEUE='2' .* must be a number \(int\)"):
        patch_frame_config(SQLITE_FILES_PER_QUEUE="2")  # in code, the type itself (environment variables are text)
    patch_frame_config(SQLITE_LEASE_SECONDS=7, LOG_CONSOLE=0, SQLITE_FILES_PER_QUEUE=2)
    assert (settings.get("SQLITE_LEASE_SECONDS"), settings.get("LOG_CONSOLE"),
            settings.get("SQLITE_FILES_PER_QUEUE")) == (7.0, False, 2)
    (tmp_path / "distributed_frame_config.py").write_text("SQLITE_LEASE_SECONDS = 'soon'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUNBOOST_LIKE_")}
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", "from funboost_like.core.config import settings\n"
                          "settings.get('REDIS_URL')"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode != 0
    assert "SQLITE_LEASE_SECONDS='soon' (from " in out.stderr and "distributed_frame_config.py) must be a number" \
        in out.stderr
    (tmp_path / "distributed_frame_config.py").write_text("SQLITE_LEASE_SECONDS = 7 +\n")
    out = subprocess.run([sys.executable, "-m", "funboost_like", "show-config"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "distributed_frame_config.py failed to load: SyntaxError" in out.stderr
    assert "Traceback" not in out.stderr


def test_unbuilt_broker_fails_at_decoration(queue_name: str) -> None:
    with pytest.raises(ValueError, match=r"ROCKETMQ \(11\) is not built yet"):
        task_deco(queue_name, broker_kind=BrokerEnum.ROCKETMQ)
    with pytest.raises(ValueError, match="did you mean 'REDIS_STREAM'"):
        task_deco(queue_name, broker_kind="REDIS_STREEM")


def test_pool_shrinks_after_keep_alive(queue_name: str) -> None:
    patch_frame_config(THREAD_KEEP_ALIVE_SECONDS=0.3)
    gate = threading.Barrier(6, timeout=5)

    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, concurrent_num=20)
    def blocking(x: int) -> None:
        gate.wait()  # five calls must run at the same time: the pool has to grow to at least five

    for i in range(5):
        blocking.push(i)
    blocking.consume()
    gate.wait()
    broker = get_broker(BrokerEnum.LOCAL_PYTHON_QUEUE)
    assert isinstance(broker, MemoryBroker)
    broker.join(queue_name, timeout=5)
    assert blocking.consumer.worker_count >= 5
    deadline = time.monotonic() + 5
    while blocking.consumer.worker_count > 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert blocking.consumer.worker_count <= 1


def test_consumer_logs_rate_and_time_left(queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    patch_frame_config(STATS_LOG_INTERVAL_SECONDS=0.3)

    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, qps=50, log_level=logging.INFO)
    def slow(x: int) -> None:
        pass

    slow.publish_many([{"x": i} for i in range(200)])
    with caplog.at_level(logging.INFO, logger=f"funboost_like.{queue_name}"):
        slow.consume()
        time.sleep(1.2)
    lines = [r.getMessage() for r in caplog.records if "calls/s over the last minute" in r.getMessage()]
    assert lines, caplog.text
    assert "waiting; estimated time left" in lines[-1]
    rate = float(lines[-1].split(": ", 1)[1].split(" calls/s")[0])
    assert 35 <= rate <= 60


def test_a_stats_interval_of_0_logs_no_rate_line(queue_name: str, caplog: pytest.LogCaptureFixture) -> None:
    """STATS_LOG_INTERVAL_SECONDS=0 logged the rate line, and counted the queue on the broker for it, at
    every tick of the fetcher (4 times a second); 0 now turns the line off."""
    patch_frame_config(STATS_LOG_INTERVAL_SECONDS=0)
    done = threading.Event()

    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, qps=20, log_level=logging.INFO)
    def paced(x: int) -> None:
        if x == 15:
            done.set()  # 0.75 s after the first call: three ticks at least

    paced.publish_many([{"x": i} for i in range(16)])
    with caplog.at_level(logging.INFO, logger=f"funboost_like.{queue_name}"):
        paced.consume()
        assert done.wait(10)
    assert not [r for r in caplog.records if "calls/s over the last minute" in r.getMessage()], caplog.text


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", ["qps", "function_timeout", "msg_schedule_time_intercal", "retry_backoff",
                                  "retry_backoff_max", "msg_expire_senconds", "task_filtering_expire_seconds"])
def test_a_number_parameter_must_be_finite(queue_name: str, name: str, value: float) -> None:
    """NaN and infinity were taken: `qps=inf` killed the fetcher thread at its start (OverflowError) and
    `qps=nan` never ran a call, both silently; the operations registry then failed to write the consumer's
    record (JSON has neither) every 0.2 s. The publish-time options refused them already."""
    extra = {"do_task_filtering": True} if name == "task_filtering_expire_seconds" else {}
    with pytest.raises(ConfigurationError, match=f"{name} must be a finite number >= 0, got {value!r}"):
        task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, **{name: value}, **extra)(lambda x: x)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1])
def test_set_qps_takes_only_a_finite_rate(queue_name: str, value: float) -> None:
    """`fn.consumer.set_qps(float("inf"))` was taken, and the fetcher thread died on its next tick."""
    @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
    def f(x: int) -> None:
        pass

    with pytest.raises(ValueError, match="qps must be a finite number >= 0"):
        f.consumer.set_qps(value)
    f.consumer.set_qps(0)


def test_on_off_parameters_must_be_true_or_false(queue_name: str) -> None:
    def f(x: int) -> None:
        pass

    for name in ("is_do_not_run_by_specify_time_effect", "do_task_filtering", "create_logger_file",
                 "is_using_rpc_mode", "is_consuming_function_use_multi_params", "use_cache"):
        with pytest.raises(ConfigurationError, match=f"{name} must be True or False, got 'False'"):
            task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, **{name: "False"})(f)
    with pytest.raises(ConfigurationError, match="is_print_detail_exception must be True or False, got None"):
        task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, is_print_detail_exception=None)(f)
    booster = task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, is_print_detail_exception=0,
                        do_task_filtering=1)(f)  # the seed writes 0 and 1
    assert booster.params.is_print_detail_exception is False and booster.params.do_task_filtering is True


def test_logging_parameters_are_checked_at_decoration(queue_name: str) -> None:
    def f(x: int) -> None:
        pass

    with pytest.raises(ConfigurationError, match="log_level must be a logging level"):
        task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, log_level=None)(f)
    with pytest.raises(ConfigurationError, match="log_level must be a logging level"):
        task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, log_level="LOUD")(f)
    with pytest.raises(ConfigurationError, match="logger_prefix must be a string"):
        task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, logger_prefix=None)(f)
    assert task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE, log_level="info")(f).params.log_level == 20


def test_the_status_config_may_be_a_dict_or_none(queue_name: str) -> None:

    def f(x: int) -> None:
        pass

    conf = {"is_save_status": True, "is_save_result": True, "expire_seconds": 10}
    booster = task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE,
                        function_result_status_persistance_conf=conf)(f)
    expected = FunctionResultStatusPersistanceConfig(True, True, 10)
    assert booster.params.function_result_status_persistance_conf == expected
    off = task_deco(queue_name + "_off", broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE,
                    function_result_status_persistance_conf=None)(f)
    assert off.params.function_result_status_persistance_conf == FunctionResultStatusPersistanceConfig()
    with pytest.raises(ConfigurationError, match="unexpected keyword argument 'is_save'"):
        task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE,
                  function_result_status_persistance_conf={"is_save": True})(f)
    with pytest.raises(ConfigurationError, match="must be a FunctionResultStatusPersistanceConfig"):
        task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE,
                  function_result_status_persistance_conf=True)(f)
    with pytest.raises(ConfigurationError, match="expire_seconds must be a number >= 0"):
        task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE,
                  function_result_status_persistance_conf=FunctionResultStatusPersistanceConfig(True, False, -1))(f)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "infinity"])
def test_the_status_expiry_must_be_finite(queue_name: str, value: float) -> None:
    """NaN and infinity were taken as ``expire_seconds`` (the check was ``expire < 0``)."""
    message = rf"expire_seconds must be a number >= 0 \(finite\), got {value!r}"
    with pytest.raises(ConfigurationError, match=message):
        FunctionResultStatusPersistanceConfig(True, True, value)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=message):
        task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE,
                  function_result_status_persistance_conf={"is_save_status": True, "expire_seconds": value})(print)


def test_a_method_decorated_in_its_class_is_refused_with_the_reason(queue_name: str) -> None:
    with pytest.raises(ConfigurationError, match=r"B\.m is a method \(its first parameter is 'self'\)"):
        class B:
            @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
            def m(self, y: int) -> None:
                pass

    def outer() -> object:
        @task_deco(queue_name, broker_kind=BrokerEnum.LOCAL_PYTHON_QUEUE)
        def inner(self: int, y: int) -> None:  # a plain function may name its parameter self
            pass

        return inner

    assert outer() is not None
