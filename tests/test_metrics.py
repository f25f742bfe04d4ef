"""Caption metrics: pycocoevalcap's numbers, the Python tokenizer against the Java PTB one, multiple references."""
import pytest

import compare

REFERENCES = {
    "surf": ["A man riding a wave on top of a surfboard.", "A surfer is riding a big wave in the ocean.",
             "A person on a surfboard rides a wave.", "Surfer riding a large wave, isn't he?"],
    "dogs": ["Two dogs play with a frisbee in the park.", "Two dogs running on the grass after a frisbee.",
             "A pair of dogs chasing a frisbee on a lawn."],
    "pizza": ["A pizza with cheese and tomatoes on a plate.", "A close up of a pizza on a wooden table.",
              "A cheese pizza sitting on top of a white plate.", "Someone's pizza, ready to eat."],
}
CANDIDATES = {"surf": "A man riding a wave on a surfboard.", "dogs": "Two dogs are playing with a frisbee.",
              "pizza": "A pizza on a plate on a table."}
# computed by pycocoevalcap 1.2 (PTB tokenizer on Java 17) when this test was written
PINNED = {"BLEU-4": 0.4834864747593892, "ROUGE-L": 0.688237361673547, "CIDEr-D": 2.326146788998247,
          "METEOR": 0.36783101586019445}
ORDINARY_CAPTIONS = [
    "A man riding a wave on top of a surfboard.", "A surfer's riding the big wave, isn't he?",
    "A t-shirt and jeans on a bed.", "A 3.5 inch screen; a cat (sleeping) on it!",
    "Three people... standing near a bus-stop", 'A "quoted" word and it\'s fine', "The giraffe's neck is long",
    "A plate of food with broccoli, rice & chicken.", "Cars are parked on the side of a street: busy day",
    "A kitchen with a stove - and a sink", "They're playing tennis", "I'm sure it'll rain; we'd better go",
    "Two zebras standing in a field of grass 2 ", "An old-fashioned train at the station.", "A boy/girl and a dog",
    "A sign that says 'STOP' near the road.", "Un café près de la gare.", "A [red] {blue} bus\nat night",
]

needs_java = pytest.mark.skipif(not compare.java_available(), reason="Java is not installed: .ci/run installs it")


@needs_java
def test_java_path_reproduces_pycocoevalcap_values():
    scores, skipped = compare.score_captions(REFERENCES, CANDIDATES, use_java=True)
    for name, value in PINNED.items():
        assert scores[name] == pytest.approx(value, abs=1e-12), name
    assert scores["SPICE"] is None and "SPICE" in skipped  # never a zero


def test_python_path_gives_the_same_values_without_java():
    scores, skipped = compare.score_captions(REFERENCES, CANDIDATES, use_java=False)
    for name in ("BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert scores[name] == pytest.approx(PINNED[name], abs=1e-12), name
    assert scores["METEOR"] is None and scores["SPICE"] is None
    assert skipped == {"METEOR": "needs Java", "SPICE": "needs Java"}


@needs_java
def test_python_tokenizer_matches_the_ptb_tokenizer_on_captions():
    java = compare.tokenize_all({number: [caption] for number, caption in enumerate(ORDINARY_CAPTIONS)}, True)
    assert [compare.python_tokenize(caption) for caption in ORDINARY_CAPTIONS] == [
        java[number][0] for number in range(len(ORDINARY_CAPTIONS))]


def test_every_reference_counts():
    references = {"image": ["a dog runs on the beach", "a cat sleeps on a sofa", "a red bus drives down the street"],
                  "other": ["two people ride bicycles", "a bowl of fruit on a table"]}
    def score(candidate):
        return compare.score_captions(references, {"image": candidate, "other": "a bowl of fruit"}, False)[0]
    matching_third, matching_none = score("a red bus drives down the street"), score("a plane flies in the sky")
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert matching_third[name] > matching_none[name], name
    assert matching_third["BLEU-4"] > 0.5
