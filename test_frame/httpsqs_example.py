"""Seed section 6.19, httpsqs as the queue: ``@task_deco('httpsqs_queue_test', broker_kind=BrokerEnum.HTTPSQS)``.

Needs an httpsqs 1.7 server. Where none is installed, the fixture server the tests use speaks its
protocol (standard library only, memory only unless given ``-x DIR``)::

    python tests/httpsqs_server.py -p 1218 -a mypass123 &
    FUNBOOST_LIKE_HTTPSQS_URL='http://127.0.0.1:1218/?auth=mypass123' python test_frame/httpsqs_example.py publish
    FUNBOOST_LIKE_HTTPSQS_URL='http://127.0.0.1:1218/?auth=mypass123' python test_frame/httpsqs_example.py

(or ``HTTPSQS_URL = "http://127.0.0.1:1218/?auth=mypass123"`` in ``distributed_frame_config.py``). The
publisher pushes 20 calls, five of them with a countdown of 3 seconds (httpsqs has no delays: the
consumer keeps them until due, docs/httpsqs.md). httpsqs is at-most-once: a consumer stopped with
Ctrl-C puts back what it had not started, one that is killed loses the calls it held.
"""

import sys
import time

from funboost_like import BrokerEnum, PriorityConsumingControlConfig, task_deco


@task_deco('httpsqs_queue_test', broker_kind=BrokerEnum.HTTPSQS, concurrent_num=5, qps=10)
def add(x, y):
    time.sleep(0.2)
    print(f'{x} + {y} = {x + y}')
    return x + y


if __name__ == '__main__':
    if sys.argv[1:] == ['publish']:
        for i in range(15):
            add.push(i, y=i * 2)
        for i in range(15, 20):
            add.publish({'x': i, 'y': i * 2}, priority_control_config=PriorityConsumingControlConfig(countdown=3))
        print('queue holds', add.get_message_count(), 'calls')
    else:
        add.consume()
