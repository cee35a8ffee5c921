"""Consumer loops and what they share.

Four loop shapes, one policy:

- ``quix``: per record, as a quixstreams application (ingestion, moderation, feedback);
- ``batch``: micro-batches (retrieval: queries, documents, the cache filler);
- ``inflight``: many records in flight at once (inference);
- ``checkpointed``: state kept in a file, committed after it is saved (drift).

What they share: ``delivery`` (produce, await the broker's acks, then commit: the
commit-after-output rule), ``dispatch`` (decoding and the dead-letter rule), ``stop``
(SIGTERM and SIGINT; quixstreams' ``Application.run`` handles them itself and flushes
before it commits), and ``ports`` (the small Consumer and Producer Protocols the loops
take, so their pause, seek and commit logic is unit-tested on in-memory doubles).
Settings, Kafka clients, lag, metrics, traces and JSON logs live here too.
"""
