"""One root exception for the project; client errors are translated at the boundary."""


class PipelineError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(PipelineError):
    """Settings are missing or inconsistent."""


class BrokerError(PipelineError):
    """The Kafka broker could not be started, reached or administered."""


class EngineError(PipelineError):
    """The generation engine failed on a request."""


class StoreError(PipelineError):
    """The vector store failed."""
