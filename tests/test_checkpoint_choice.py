"""The checkpoint rule on hand-written metric histories, and early stopping."""

import pytest

from dreambooth_moslora.trainer.checkpoint_choice import Choice, ChoiceRule, choose, should_stop_early

BASE = {"step": 0, "dino": 0.40, "clip_i": 0.70, "clip_t": 0.30, "class_similarity": 0.50}


def _record(step, dino, clip_i, clip_t=0.30, class_similarity=0.50):
    return {"step": step, "dino": dino, "clip_i": clip_i, "clip_t": clip_t, "class_similarity": class_similarity}


def test_the_highest_fidelity_eligible_step_wins():
    history = [BASE, _record(100, 0.50, 0.74), _record(200, 0.60, 0.80), _record(300, 0.55, 0.78)]
    assert choose(history) == Choice(step=200, validations_since_best=1)


def test_fidelity_is_the_mean_of_dino_and_clip_i():
    # by dino alone 100 would win (0.60 > 0.50); by the mean 200 does (0.70 > 0.69)
    history = [BASE, _record(100, 0.60, 0.78), _record(200, 0.50, 0.90)]
    assert ChoiceRule().subject_fidelity(history[2]) == pytest.approx(0.70)
    assert choose(history).step == 200


def test_a_step_whose_prompt_fidelity_fell_past_the_tolerance_is_skipped():
    # 0.26 is 13% below step 0's 0.30 (limit 10%); 0.28 is 7% below
    history = [BASE, _record(100, 0.50, 0.75, clip_t=0.28), _record(200, 0.70, 0.85, clip_t=0.26)]
    assert choose(history).step == 100
    assert choose(history, ChoiceRule(prompt_tolerance=0.15)).step == 200


def test_a_step_whose_class_drifted_toward_the_subject_is_skipped():
    # class similarity 0.75 is 0.25 above step 0's 0.50 (the default limit 0.20); 0.68 is 0.18 above
    history = [BASE, _record(100, 0.50, 0.75, class_similarity=0.68), _record(200, 0.70, 0.85, class_similarity=0.75)]
    assert choose(history).step == 100
    assert choose(history, ChoiceRule(class_tolerance=0.30)).step == 200
    assert choose(history, ChoiceRule(class_tolerance=0.10)).step is None  # neither within 0.10


def test_with_several_subjects_every_subject_must_keep_its_class():
    """The means rank the steps; the tolerances hold per subject, so one subject's drift cannot hide in a mean."""
    def record(step, dog_class, cat_class):
        subjects = {"dog": {"subject": 0.5 + step / 1000, "class_similarity": dog_class},
                    "cat": {"subject": 0.5 + step / 1000, "class_similarity": cat_class}}
        return {"step": step, "subject": 0.5 + step / 1000, "class_similarity": (dog_class + cat_class) / 2,
                "subjects": subjects}
    history = [record(0, 0.2, 0.6), record(100, 0.25, 0.6), record(200, 0.1, 0.85)]
    # step 200's mean drift (+0.075) is within 0.20 of step 0's, but the cat's (+0.25) is not
    assert choose(history, ChoiceRule(class_tolerance=0.2)).step == 100
    assert choose(history, ChoiceRule(class_tolerance=0.3)).step == 200


def test_a_baseline_without_subjects_still_holds_each_subject_to_the_tolerances():
    """A run resumed from an older metrics file: step 0 measured one subject, at the top level."""
    history = [{"step": 0, "subject": 0.5, "class_similarity": 0.2},
               {"step": 100, "subject": 0.9, "class_similarity": 0.2,
                "subjects": {"dog": {"subject": 0.9, "class_similarity": 0.2},
                             "cat": {"subject": 0.9, "class_similarity": 0.95}}}]
    assert choose(history, ChoiceRule(class_tolerance=0.2)).step is None


def test_analyzer_records_with_only_subject():
    history = [{"step": 0, "subject": 0.10, "class_similarity": 0.30},
               {"step": 100, "subject": 0.50, "class_similarity": 0.35},
               {"step": 200, "subject": 0.80, "class_similarity": 0.55},  # drifted 0.25
               {"step": 300, "subject": 0.60, "class_similarity": 0.38}]
    assert ChoiceRule().subject_fidelity(history[1]) == 0.50
    assert choose(history) == Choice(step=300, validations_since_best=0)
    # a measure below zero still ranks: -0.05 beats -0.20
    below_zero = [{"step": 0, "subject": -0.3}, {"step": 1, "subject": -0.2}, {"step": 2, "subject": -0.05}]
    assert choose(below_zero).step == 2


def test_missing_measures():
    rule = ChoiceRule()
    assert rule.subject_fidelity({"step": 5, "clip_i": 0.8, "dino": None}) == 0.8
    assert rule.subject_fidelity({"step": 5, "clip_t": 0.3}) is None
    # a tolerance whose measure the step or step 0 lacks is not applied
    assert rule.eligible({"step": 5, "dino": 0.9, "class_similarity": 0.99}, {"step": 0, "dino": 0.4})
    assert rule.eligible({"step": 5, "dino": 0.9, "clip_t": 0.01}, {"step": 0, "class_similarity": 0.5})
    assert not rule.eligible({"step": 5, "dino": 0.9, "clip_t": 0.01}, {"step": 0, "clip_t": 0.3})
    # a step without a subject measure cannot be ranked, however well it keeps the prompt
    history = [BASE, {"step": 100, "clip_t": 0.31}, _record(200, 0.45, 0.72), {"step": 300, "clip_t": 0.31}]
    assert choose(history) == Choice(step=200, validations_since_best=1)
    # no step 0 in the history: no tolerance is applied
    assert choose([_record(100, 0.5, 0.7), _record(200, 0.9, 0.9, clip_t=0.01)]).step == 200


def test_a_tie_keeps_the_earlier_step():
    history = [BASE, _record(100, 0.60, 0.80), _record(200, 0.60, 0.80), _record(300, 0.60, 0.80)]
    assert choose(history) == Choice(step=100, validations_since_best=2)


def test_nothing_eligible_and_step_0_are_never_chosen():
    assert choose([]) == Choice(step=None, validations_since_best=0)
    assert choose([BASE]).step is None  # the baseline is never chosen, however good
    history = [BASE, _record(100, 0.9, 0.9, clip_t=0.10), _record(200, 0.9, 0.9, class_similarity=0.9)]
    assert choose(history) == Choice(step=None, validations_since_best=2)
    assert choose([BASE, _record(100, float("nan"), float("nan"))]).step is None


def test_validations_since_best_counts_the_validations_after_the_best():
    history = [BASE, _record(100, 0.5, 0.8)]
    counts = []
    for step, dino in [(200, 0.6), (300, 0.55), (400, 0.58), (500, 0.65), (600, 0.5)]:
        history.append(_record(step, dino, 0.8))
        counts.append(choose(history).validations_since_best)
    assert counts == [0, 1, 2, 0, 1]


def test_should_stop_early():
    assert should_stop_early(Choice(step=100, validations_since_best=3), patience=3)
    assert not should_stop_early(Choice(step=100, validations_since_best=2), patience=3)
    assert not should_stop_early(Choice(step=100, validations_since_best=10), patience=None)
    assert not should_stop_early(Choice(step=None, validations_since_best=10), patience=3)
    history = [BASE] + [_record(100 * i, d, 0.8) for i, d in enumerate([0.6, 0.5, 0.55, 0.59], 1)]
    assert should_stop_early(choose(history), patience=3) and not should_stop_early(choose(history), patience=4)


def test_the_reason_names_the_step_its_fidelity_and_what_it_kept():
    rule = ChoiceRule()
    reason = rule.reason(_record(200, 0.60, 0.80, clip_t=0.29, class_similarity=0.55), BASE)
    for part in ["Step 200", "0.700", "0.290", "0.300", "10%", "0.550", "0.500"]:
        assert part in reason
    assert reason.endswith(".") and ". " not in reason  # one sentence
    assert "no prompt or class measure" in rule.reason({"step": 3, "subject": 0.5}, {"step": 0, "subject": 0.1})


def test_a_baseline_measure_that_is_not_a_number_applies_no_tolerance():
    """A NaN step-0 class measure once made every later step ineligible: nothing was ever chosen."""
    history = [{**BASE, "class_similarity": float("nan")}, _record(100, 0.6, 0.8, class_similarity=0.9)]
    assert choose(history).step == 100
    history = [{**BASE, "clip_t": float("nan")}, _record(100, 0.6, 0.8, clip_t=0.01)]
    assert choose(history).step == 100
    assert "nan" not in ChoiceRule().reason(history[1], history[0])
    history = [BASE, _record(100, 0.6, 0.8, clip_t=float("nan"))]  # the step's own NaN is still refused
    assert choose(history).step is None
