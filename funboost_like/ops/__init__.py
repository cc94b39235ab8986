"""Operations: the registry of queues and consumers, run-time control, and the service layer under the CLI.

* :mod:`~funboost_like.ops.registry`: where the records live and their layout (queues seen, worker
  heartbeats, control records), read and written through the key-value store contract only.
* :mod:`~funboost_like.ops.agent`: the consumer side: a middleware (pause) and one thread per process
  that beats for its consumers and applies control records within about a second.
* :mod:`~funboost_like.ops.service`: what the CLI (and later the JSON API and the web pages) call.

See docs/operations.md.
"""
