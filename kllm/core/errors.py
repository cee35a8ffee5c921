"""One root exception for the project; client errors are translated at the boundary
(``raise ... from exc``), so a caller catches ``PipelineError`` and nothing else.

The hierarchy::

    PipelineError                    kllm.core.errors
    ├── ConfigError                  settings, policy or template files missing or wrong
    ├── BrokerError                  the Kafka broker: start, reach, administer, publish
    ├── EngineError                  a generation engine failed on a request
    │   └── ContextLengthError       the prompt does not fit the model's context (the
    │                                caller's to fix: not retried, not the model's fault)
    ├── StoreError                   the vector store failed
    ├── EmbedderError                processors.retrieval: the embedding model failed
    ├── SchemaError                  schemas.codec: a record that does not decode
    ├── CaseFileError                processors.evaluation: a golden-set file is malformed
    ├── Rejected                     processors.base: a stage refused a record on purpose
    ├── GuardrailError               processors.guardrails: a guardrail model failed
    ├── UnreadableFile               kllm.adapters.retrieval.documents: a document file
    └── HttpError                    kllm.gateway.http: a request the gateway refuses

Every stage dead-letters a record whose processing raised a ``PipelineError``
(kllm.runtime.dispatch). Anything else is a bug: it is logged with its traceback and
dead-letters that record too (``InternalError``), so one record never stops a stage.
"""


class PipelineError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(PipelineError):
    """Settings are missing or inconsistent."""


class BrokerError(PipelineError):
    """The Kafka broker could not be started, reached or administered."""


class EngineError(PipelineError):
    """The generation engine failed on a request."""


class ContextLengthError(EngineError):
    """The engine refused the request because it does not fit the model's context."""


class StoreError(PipelineError):
    """The vector store failed."""
