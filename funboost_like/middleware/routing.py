"""Exchanges and routing keys (seed 003, DESIGN §9): the decoration-time check of ``broker_exclusive_config``.

The routing itself is the broker's (:meth:`~funboost_like.brokers.base.Broker.bind`,
:meth:`~funboost_like.brokers.base.Broker.publish_routed`): the publisher publishes through the
queue's exchange and the consumer binds its queue when it starts. No middleware runs around calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from funboost_like.brokers.routing import routing_config
from funboost_like.core.errors import ConfigurationError

if TYPE_CHECKING:
    from funboost_like.brokers.base import Capabilities
    from funboost_like.core.consumer import Consumer
    from funboost_like.core.params import ConsumerParams


def build(consumer: Consumer) -> None:
    return None


def check_params(params: ConsumerParams, capabilities: Capabilities) -> None:
    """A malformed ``broker_exclusive_config``, or an exchange on a broker without routing, raises here."""
    config = routing_config(params.broker_exclusive_config, params.queue_name, capabilities.queue_options)
    if capabilities.check_queue_options is not None:
        capabilities.check_queue_options(capabilities.own_options(params.broker_exclusive_config))
    if config is not None and capabilities.routing == "none":
        raise ConfigurationError(f"broker {params.broker.name} has no exchanges or routing keys; "
                                 f"exchange_name={config.exchange!r} needs a broker with routing (DESIGN §9)")
