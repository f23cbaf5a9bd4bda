"""Verdict extraction and the paper's quality filters (refusal, first person, verdict)."""

from __future__ import annotations

import pytest

from icm.data.quality import check_description, check_explanation, extract_verdict, first_person, is_refusal


@pytest.mark.parametrize(
    "text, label, strong",
    [
        ("The image is sexy because of the pose and the low neckline.", True, True),
        ("The image is not sexy. The woman wears a winter coat.", False, True),
        ("This picture isn't sexy at all; it is a plain portrait.", False, True),
        ("She stands by a door. Therefore, it can be confidently asserted that this image is not sexy.", False, True),
        ("It can be considered sexy due to the pose.", True, True),
        ("The image is sexy, not because of nudity but because of the suggestive pose.", True, True),
        ("This lack of detail prevents the image from being considered sexy.", False, True),
        ("The overall atmosphere is calm rather than sexy.", False, False),
        ("The woman has a sexy pose and a sultry look.", True, False),
        ("The woman wears a coat and stands by a wall.", None, False),
    ],
)
def test_verdicts(text, label, strong):
    v = extract_verdict(text, "sexy")
    assert v.label is label, (text, v)
    if label is not None:
        assert v.strong is strong and v.evidence


def test_a_strong_statement_outweighs_weak_mentions_and_conflicts_are_mixed():
    v = extract_verdict("The image is not sexy. Some might call the red dress a sexy choice.", "sexy")
    assert v.label is False and v.strong and not v.mixed
    v = extract_verdict("The image is sexy. Later: the image is not sexy.", "sexy")
    assert v.mixed and v.label is True
    v = extract_verdict("She has a sexy smile. The setting lacks a sexy atmosphere.", "sexy")
    assert v.label is None and v.mixed


def test_other_terms_and_multi_word_terms():
    assert extract_verdict("The image is related to gambling: chips and cards.", "gambling").label is True
    assert extract_verdict("The image is not related to gambling.", "gambling").label is False
    assert extract_verdict("The image is horrifying because of the blood.", "horrifying").label is True
    assert extract_verdict("The image is not hate-speech.", "hate_speech").label is False
    assert extract_verdict("The image is non-sexy.", "sexy").label is False


def test_refusals_and_first_person():
    assert is_refusal("I'm sorry, but I can't help with describing this image.")
    assert is_refusal("Sure, I'd be happy to help! What are your questions?")
    assert is_refusal("As an AI language model, I cannot judge images.")
    assert is_refusal("I cannot view the image you uploaded.")
    assert not is_refusal("The woman is sorry-looking and cannot see the camera.")
    assert first_person("I think the image is sexy.") == "I"
    assert first_person("My view: the image is sexy.") == "My"
    assert first_person('The sign reads "I love my cat" and the image is not sexy.') is None
    assert first_person("The woman is facing away, giving us a view of her back.") is None
    assert first_person("A poster of World War I. The image is not sexy.") is None


def test_check_explanation_applies_the_filters_it_is_given():
    ok = "The image is sexy because the close framing and the pose draw attention to her body."
    verdict, found = check_explanation(ok, "sexy", True)
    assert verdict.label is True and found == []
    _, found = check_explanation(ok, "sexy", False)
    assert [f.reason for f in found] == ["contradiction"]
    _, found = check_explanation("She stands by a wall in a long coat, looking at the camera calmly.", "sexy", True)
    assert [f.reason for f in found] == ["no_verdict"]
    _, found = check_explanation("I believe the image is sexy because of how she poses for the camera here.", "sexy", True)
    assert [f.reason for f in found] == ["first_person"]
    _, found = check_explanation("I'm sorry, I can't help with that.", "sexy", True)
    assert next(f.reason for f in found) == "refusal" and "no_verdict" not in [f.reason for f in found]
    _, found = check_explanation("The image is sexy because of the framing and the way she", "sexy", True)
    assert [f.reason for f in found] == ["truncated"]
    _, found = check_explanation(ok, "sexy", False, filters=["refusal"])
    assert found == []
    assert [f.reason for f in check_description("")] == ["empty"]
    assert [f.reason for f in check_description("A woman.")] == ["too_short"]
    assert check_description("A woman in a red coat stands in front of a brick wall, smiling.") == []
