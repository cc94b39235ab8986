"""Seed section 2.7 (RPC mode), the client side: publishes calls and prints their results.

Copied from the seed; the seed uses PriorityConsumingControlConfig without importing it, so its
import is added. Run from the repository root, with test_consume running:

    python -m test_frame.test_rpc.test_publish
"""
# ruff: noqa: I001  -- the seed's code, kept as written
from test_frame.test_rpc.test_consume import add
from funboost_like import PriorityConsumingControlConfig

for i in range(100):
    async_result = add.push(i, i * 2)
    print(async_result.result)


    # If add's @task_deco did not set is_using_rpc_mode=True, RPC mode can also be chosen per publish.
    async_result = add.publish(dict(a=i*10, b=i * 20),priority_control_config = \
                                PriorityConsumingControlConfig(is_using_rpc_mode=True))
    print(async_result.status_and_result)
