"""The reinforcement stage's reward: pycocoevalcap's CIDEr-D over the training references to the last digit, for
captions scored in any batch, with Java's tokenizer and without; nothing for a caption that did not end."""
import pytest
from pycocoevalcap.cider.cider import Cider

from captioning.caption_reward import CiderReward
from captioning.metrics import tokenize_all

REFERENCES = {
    "surf.jpg": ["A man riding a wave on top of a surfboard.", "A surfer is riding a big wave in the ocean.",
                 "A person on a surfboard rides a wave.", "Surfer riding a large wave, isn't he?"],
    "dogs.jpg": ["Two dogs play with a frisbee in the park.", "Two dogs running on the grass after a frisbee.",
                 "A pair of dogs chasing a frisbee on a lawn."],
    "pizza.jpg": ["A pizza with cheese and tomatoes on a plate.", "A close up of a pizza on a wooden table.",
                  "A cheese pizza sitting on top of a white plate.", "Someone's pizza, ready to eat."],
    "bus.jpg": ["A red bus parked on the side of a street.", "A double decker bus on a city street."],
    "cat.jpg": ["A cat sleeping on a laptop keyboard.", "A grey cat lying on a computer.",
                "A cat naps on top of an open laptop."],
}
SAMPLES = [("dogs.jpg", "Two dogs are playing with a frisbee."), ("surf.jpg", "A man riding a wave on a surfboard."),
           ("surf.jpg", "a man on a"), ("cat.jpg", "the the the the the"), ("dogs.jpg", ""),
           ("bus.jpg", "A red double decker bus on a street."), ("surf.jpg", "A man riding a wave on a surfboard.")]


def pycocoevalcap_cider_d(references, key, caption, use_java):
    """What pycocoevalcap's Cider gives the caption as its image's candidate, over the whole training corpus (every
    other image's candidate its first reference: the scores depend on the references alone, not on the others)."""
    candidates = {other: [references[other][0]] for other in references}
    candidates[key] = [caption]
    gts, res = tokenize_all(references, use_java), tokenize_all(candidates, use_java)
    _, scores = Cider().compute_score(gts, res)
    return float(dict(zip(gts, scores))[key])


@pytest.mark.parametrize("use_java", [True, False], ids=["Java's PTB tokenizer", "the Python tokenizer"])
def test_the_reward_is_pycocoevalcap_s_cider_d_over_the_training_references_in_any_batch(use_java, java):
    reward = CiderReward(REFERENCES, use_java)
    keys, captions = zip(*SAMPLES)
    rewards = reward(list(keys), list(captions), [True] * len(SAMPLES))
    expected = [pycocoevalcap_cider_d(REFERENCES, key, caption, use_java) for key, caption in SAMPLES]
    assert rewards == expected  # to the last digit
    assert rewards[1] == rewards[6] > rewards[2] > 0 and rewards[4] == 0.0  # a good caption, a fragment, nothing
    # the same caption in another batch, alone: the same reward (the corpus, not the batch, sets the frequencies)
    assert reward(["surf.jpg"], [SAMPLES[1][1]], [True]) == [rewards[1]]


def test_pycocoevalcap_scoring_a_batch_alone_gives_another_function(java):
    """The pitfall the corpus's frequencies avoid: Cider handed a batch takes its frequencies from that batch."""
    key, caption = SAMPLES[1]
    gts = tokenize_all({key: REFERENCES[key], "dogs.jpg": REFERENCES["dogs.jpg"]}, True)
    res = tokenize_all({key: [caption], "dogs.jpg": [SAMPLES[0][1]]}, True)
    batch_alone = float(Cider().compute_score(gts, res)[1][0])
    assert batch_alone != CiderReward(REFERENCES, True)([key], [caption], [True])[0]


def test_a_caption_that_did_not_end_within_its_budget_gets_no_reward():
    reward = CiderReward(REFERENCES, use_java=False)
    caption = "A man riding a wave on a surfboard."
    ended, cut_off = reward(["surf.jpg", "surf.jpg"], [caption, caption], [True, False])
    assert ended > 1 and cut_off == 0.0
