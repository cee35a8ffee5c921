"""kllm: a Kafka-native LLM serving pipeline.

This package holds the glue that is not a stage: the command-line tool, the
embedded broker launcher, the process supervisor, settings and adapters to
external systems. Stage logic lives in ``processors``, wiring in ``services``.
"""

__version__ = "0.1.0"
