"""Moderation stage: llm.generations -> llm.responses + llm.moderation.events."""

from __future__ import annotations

from kllm import logs
from kllm.settings import StageSettings
from processors.dispatch import StageLogic
from processors.moderation import Moderator, TextClassifier
from schemas import Generation
from services.runtime import serve
from topics import GENERATIONS

STAGE = "moderation"


class Settings(StageSettings):
    profanity_threshold: float = 0.8


def build(
    settings: Settings, *, classifier: TextClassifier | None = None
) -> StageLogic[Generation]:
    if classifier is None:
        from kllm.adapters.profanity import ProfanityClassifier

        classifier = ProfanityClassifier()
    moderator = Moderator(classifier, block_threshold=settings.profanity_threshold)
    return StageLogic(STAGE, Generation, moderator.process)


def main() -> None:
    settings = Settings()
    logs.configure(settings.log_level)
    serve(settings, GENERATIONS, build(settings))


if __name__ == "__main__":
    main()
