"""Dead letters of a Kafka queue (for :mod:`.kafka_base`).

They are JSON envelopes in the topic ``q.dlq``, read from the offset the group
``funboost_like.q.dlq-read`` committed. A log cannot delete one record, so removing one letter
appends a tombstone ``{"fl_removed": [partition, offset]}`` to the same topic; listing skips the
tombstones and the letters they name. Purging moves the group's offset to the end, past letters and
tombstones alike. Two processes removing the same letter at the same moment may both see it (both
answer True): a requeue of it then publishes it twice, never loses it.
"""

from __future__ import annotations

import dataclasses

from funboost_like.brokers.base import DeadLetter
from funboost_like.brokers.dead_letters import removed_ref, tombstone
from funboost_like.brokers.kafka_client import KafkaClient, Record, log_span
from funboost_like.brokers.kafka_queue import QueueState


def _scan(client: KafkaClient, q: QueueState) -> tuple[dict[int, int], list[DeadLetter]]:
    """(the end of each partition read, the live letters in log order, each ``ref`` its (partition, offset))."""
    starts, ends = log_span(client, q.dlq, f"{q.group}.dlq-read")
    records: list[Record] = client.read(q.dlq, starts, ends, 5.0) if ends else []
    removed = {mark for record in records if (mark := removed_ref(record.value)) is not None}
    return ends, [dataclasses.replace(DeadLetter.from_envelope(q.queue, record.value),
                                      ref=(record.partition, record.offset))
                  for record in records
                  if (record.partition, record.offset) not in removed and removed_ref(record.value) is None]


def live_letters(client: KafkaClient, q: QueueState) -> list[DeadLetter]:
    """The letters neither purged nor removed, in log order."""
    return _scan(client, q)[1]


def remove(client: KafkaClient, q: QueueState, letter: DeadLetter) -> bool:
    """Append the tombstone of ``letter``; False when it is not a live letter any more."""
    if letter.ref not in {live.ref for live in live_letters(client, q)}:
        return False
    partition, offset = letter.ref
    client.produce(q.dlq, [(tombstone([partition, offset]), None, partition)])
    return True


def purge(client: KafkaClient, q: QueueState) -> int:
    """Move the reading group past everything read; return how many live letters that removed."""
    ends, letters = _scan(client, q)
    if ends:
        client.commit_offsets(f"{q.group}.dlq-read", q.dlq, ends)
    return len(letters)
