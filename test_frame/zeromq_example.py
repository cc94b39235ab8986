"""Seed section 6.16 (ZeroMQ: no server to install; the queue's name is a TCP port).

The seed's two scripts in one file, its code unchanged but for the import line::

    python test_frame/zeromq_example.py            # the consumer: starts the hub of port 30778, runs f
    python test_frame/zeromq_example.py publish    # the publisher: f.push(i) for i in range(100)

Start the consumer first, as the seed says (a publisher that comes first starts the hub itself, and
the hub keeps the calls until a consumer comes). Several consumers may run at once: they share the
calls. ZeroMQ is at-most-once here: a consumer stopped with Ctrl-C hands back what it had not
started, one that is killed loses the calls it held (docs/zeromq.md). Stop the consumer with Ctrl-C.
"""
# ruff: noqa: I001  -- the seed's import line, kept as written
import sys
import time
from funboost_like import task_deco, BrokerEnum


@task_deco('30778', broker_kind=BrokerEnum.ZEROMQ, qps=2)
def f(x):
    time.sleep(1)
    print(x)


if __name__ == '__main__':
    if sys.argv[1:] == ['publish']:
        for i in range(100):
            f.push(i)
    else:
        f.consume()
