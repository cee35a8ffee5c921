"""Consumer loops and what they share: settings, Kafka clients, the commit-after-output
rule, the dead-letter policy, metrics, traces and JSON logs.

Three loop shapes sit on it: per record (``quix``), micro-batch (``batch``) and
in flight (``inflight``); the drift stage's checkpointing loop uses the same pieces.
"""
