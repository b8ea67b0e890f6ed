"""The model's prompt: the facts with their verdicts stated as given truths, and a tighter retry.

Why: small models quote one plain sentence more faithfully than a list (measured on the demo
questions), and they judge readings badly. So the facts block is the template's own sentences
(the verdict already in words: "soil moisture is 18.9 %, below the 25 % limit (too dry)"), and
a yes/no question carries its computed answer ("Answer: Yes."); the model only phrases it. After
a failed validation the retry prompt names the start the answer must have and the words that
were wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.answers.template import sentence, template_answer
from agent.answers.validate import FAILED, Checks
from agent.answers.verdicts import Verdict, overall_answer


def facts_block(verdicts: Sequence[Verdict]) -> str:
    """The readings and verdicts as plain sentences, then "Answer: Yes." when one is computed."""
    if not verdicts:
        return ""
    label = "Sensor reading" if len(verdicts) == 1 else "Sensor readings"
    text = f"{label}: " + " ".join(sentence(v) for v in verdicts)
    answer = overall_answer(verdicts)
    if answer is not None:
        text += f" Answer: {'Yes' if answer else 'No'}."
    return text


def build_prompt(question: str, verdicts: Sequence[Verdict]) -> str:
    """The user message of the first try: the facts as data, then the question."""
    block = facts_block(verdicts)
    if not block:
        return question
    answer = overall_answer(verdicts)
    start = f'\nStart your answer with "{"Yes" if answer else "No"}".' if answer is not None else ""
    return f"{block}\n\nQuestion: {question}{start}"


def required_start(verdicts: Sequence[Verdict]) -> str:
    """What a retry must begin with: the template up to its first comma ("Yes: CO2 is 1450 ppm")."""
    full = template_answer(verdicts)
    head = full.split(",", 1)[0]
    return head.rstrip(".") if head != full else full.rstrip(".")


def offending(checks: Checks) -> list[str]:
    """The words that failed, in check order, each once."""
    out: list[str] = []
    for name in ("yes_no", "verdicts", "numbers", "units", "sensors"):
        check = getattr(checks, name)
        if check.status == FAILED:
            out += [w for w in check.offending if not w.startswith("missing ")]
    return list(dict.fromkeys(out))


def build_retry_prompt(question: str, verdicts: Sequence[Verdict], checks: Checks) -> str:
    """The user message after a failed validation: the same facts, the exact start the answer
    must have, and the words the first answer got wrong."""
    lines = [facts_block(verdicts) or "No sensor matches the question.", "", f"Question: {question}", ""]
    lines.append(f'Answer in one sentence that starts exactly with: "{required_start(verdicts)}".')
    bad = offending(checks)
    if bad:
        lines.append("These words were wrong, do not use them: " + ", ".join(f'"{w}"' for w in bad) + ".")
    return "\n".join(lines)
