"""Which validated step to keep: the rule over the metric history, and early stopping (run_record.py owns the files).

A history is a list of records in step order, one per validation, e.g. {"step": 0, "dino": 0.41, "clip_i": 0.70,
"clip_t": 0.31, "class_similarity": 0.52}; step 0 is the base model before training, the baseline the tolerances
are measured against. The mini world's analyzer gives "subject" instead of dino/clip_i and no "clip_t"; any
measure may be missing. A run of several subjects adds "subjects": {name: that subject's own record}; the
top-level measures are then their means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SUBJECT_MEASURES = ("dino", "clip_i", "subject")


def _measure(record: dict, key: str) -> float | None:
    value = record.get(key)
    return None if value is None else float(value)


def _baseline_measure(baseline: dict, key: str) -> float | None:
    """A step-0 measure that is not a number is no baseline: its tolerance is not applied (RunRecord says so)."""
    value = _measure(baseline, key)
    return value if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class ChoiceRule:
    """Highest subject fidelity among steps that keep prompt fidelity and the class."""

    prompt_tolerance: float = 0.10  # a step's clip_t may fall at most this fraction below step 0's
    class_tolerance: float = 0.20  # class_similarity may rise at most this much (absolute) above step 0's

    def subject_fidelity(self, record: dict) -> float | None:
        """Mean of the subject measures present; None when there is none, so the step cannot be ranked."""
        values = [v for v in (_measure(record, key) for key in SUBJECT_MEASURES) if v is not None]
        return sum(values) / len(values) if values else None

    def eligible(self, record: dict, baseline: dict) -> bool:
        """Within both tolerances, for every subject of a several-subject run (a mean would let one subject's
        loss of its class hide behind another's); a tolerance whose measure the step or the baseline lacks is not
        applied."""
        subjects = record.get("subjects")
        if subjects:  # a subject without a baseline of its own (a resumed older run): the top-level one
            base = baseline.get("subjects", {})
            return all(self._within(own, base.get(name, baseline)) for name, own in subjects.items())
        return self._within(record, baseline)

    def _within(self, record: dict, baseline: dict) -> bool:
        clip_t, base_clip_t = _measure(record, "clip_t"), _baseline_measure(baseline, "clip_t")
        if clip_t is not None and base_clip_t is not None:
            if not clip_t >= base_clip_t - self.prompt_tolerance * abs(base_clip_t):  # `not >=` refuses NaN
                return False
        drift, base_drift = _measure(record, "class_similarity"), _baseline_measure(baseline, "class_similarity")
        if drift is not None and base_drift is not None:
            if not drift <= base_drift + self.class_tolerance:
                return False
        return True

    def reason(self, record: dict, baseline: dict) -> str:
        """One sentence for the model card: the step's fidelity, and what it kept against step 0."""
        kept = []
        clip_t, base_clip_t = _measure(record, "clip_t"), _baseline_measure(baseline, "clip_t")
        if clip_t is not None and base_clip_t is not None:
            kept.append(f"its prompt fidelity (CLIP-T) is {clip_t:.3f} against step 0's {base_clip_t:.3f}, "
                        f"at most {self.prompt_tolerance:.0%} lower allowed")
        drift, base_drift = _measure(record, "class_similarity"), _baseline_measure(baseline, "class_similarity")
        if drift is not None and base_drift is not None:
            kept.append(f"its class samples' similarity to the subject is {drift:.3f} against step 0's "
                        f"{base_drift:.3f}, at most {self.class_tolerance:.2f} higher allowed")
        checks = "; ".join(kept) if kept else "no prompt or class measure was there to check"
        if record.get("subjects"):
            checks += (f" (means of its {len(record['subjects'])} subjects, each of which kept its own prompt "
                       "fidelity and class within those tolerances)")
        return (f"Step {record['step']} was chosen for the highest subject fidelity "
                f"({self.subject_fidelity(record):.3f}) among the steps that keep prompt fidelity and the class: "
                f"{checks}.")


@dataclass
class Choice:
    step: int | None  # None before any step after 0 is eligible
    validations_since_best: int


def baseline_of(history: list[dict]) -> dict:
    """Step 0's record; without one (a history that began later) no tolerance can be applied."""
    return next((record for record in history if record.get("step") == 0), {})


def choose(history: list[dict], rule: ChoiceRule = ChoiceRule()) -> Choice:
    """The eligible step after 0 with the highest subject fidelity; a tie keeps the earlier step, so a plateau
    counts toward early stopping."""
    baseline = baseline_of(history)
    best, best_fidelity = None, float("-inf")
    for record in history:
        fidelity = rule.subject_fidelity(record)
        if record["step"] > 0 and fidelity is not None and rule.eligible(record, baseline):
            if fidelity > best_fidelity:  # NaN never wins
                best, best_fidelity = record["step"], fidelity
    since = sum(1 for record in history if record["step"] > (best or 0))
    return Choice(step=best, validations_since_best=since)


def should_stop_early(choice: Choice, patience: int | None) -> bool:
    """Only once a best exists: a run whose steps are all ineligible so far has nothing to stop on."""
    return patience is not None and choice.step is not None and choice.validations_since_best >= patience

