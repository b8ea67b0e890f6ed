"""Answers an operator can trust (issue 12): sensor meanings, units, the picker, intents,
verdicts from rules, validation of a generated answer, the template fallback and the prompt.

Pure and deterministic: no IO, no model, no MQTT. See docs/answers.md.
"""
