"""One question from text to verdicts: pick -> intents -> facts -> verdicts, and the template.

Why: the agent, the bench and the tests all need the same sequence; the only outside input is
a reader of facts (the agent's sensor hub, a test's table), so this stays pure and testable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from agent.answers.intent import TREND, Intent, intents_for, label_words, parse_question
from agent.answers.picker import Pick, pick_sensors
from agent.answers.template import template_answer
from agent.answers.validate import Checks, validate
from agent.answers.verdicts import Verdict, decide, overall_answer
from agent.config import SensorConfig
from agent.meaning import Meaning
from agent.sensors.windows import Fact

# (sensor name, aggregate, window in seconds or None for the sensor's) -> the fact read
Reader = Callable[[str, str, float | None], Fact]


@dataclass(frozen=True)
class Grounds:
    """Everything computed for one question before (and without) the model."""

    question: str
    picks: tuple[Pick, ...]
    intents: tuple[Intent, ...]
    facts: tuple[Fact, ...]
    verdicts: tuple[Verdict, ...]
    sensors: tuple[SensorConfig, ...]
    meanings: Mapping[str, Meaning]

    @property
    def answer(self) -> bool | None:
        """The Yes/No the answer must start with, None when none is computed."""
        return overall_answer(self.verdicts)

    def check(self, text: str) -> Checks:
        return validate(
            text,
            question=self.question,
            facts=self.facts,
            verdicts=self.verdicts,
            meanings=self.meanings,
            sensors=self.sensors,
            picked=[p.sensor for p in self.picks],
        )

    def fallback(self) -> str:
        return template_answer(self.verdicts)


def ground(
    question: str,
    sensors: Sequence[SensorConfig],
    meanings: Mapping[str, Meaning],
    read: Reader,
    now: float | None = None,
) -> Grounds:
    """Pick the sensors, read one fact per intent, decide. A trend also reads the current value
    (listed as a fact after the trend): the answer may quote it, and without a configured
    tolerance or a finite ok range the trend's tolerance is relative to it."""
    picks = pick_sensors(question, sensors)
    parsed = parse_question(question, label_words(meanings))
    intents = intents_for(parsed, picks, meanings)
    facts: list[Fact] = []
    verdicts: list[Verdict] = []
    for intent in intents:
        meaning = meanings.get(intent.sensor)
        fact = read(intent.sensor, intent.agg, intent.window_s)
        facts.append(fact)
        level = None
        if intent.kind == TREND:
            current = read(intent.sensor, "last", None)
            facts.append(current)
            level = current.value
        verdicts.append(decide(fact, intent, meaning, now=now, level=level))
    return Grounds(
        question, tuple(picks), tuple(intents), tuple(facts), tuple(verdicts), tuple(sensors), meanings
    )
