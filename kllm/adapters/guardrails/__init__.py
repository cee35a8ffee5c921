"""Guardrail ports: prompt-injection classifier, presidio PII redaction, profanity scores."""
