"""The reinforcement stage's reward: CIDEr-D of each sampled caption against all references of its image, as
compare.py tokenises and scores it, with the document frequencies of the training references computed once.

pycocoevalcap's own Cider takes them from whatever it is handed: scored a batch at a time, the reward would be
another function than the CIDEr-D that compare.py reports. Self-critical training computes them once, as here."""
import numpy as np
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, cook_test

from captioning.metrics import tokenize_all


class CorpusCiderD(CiderScorer):
    """pycocoevalcap's CIDEr-D scorer (n-grams 1 to 4, sigma 6) that keeps the document frequencies and the corpus
    size of the references it was built on, whatever captions it scores afterwards (its compute_cider would set the
    corpus size from the captions it is given)."""

    def __init__(self, corpus):
        super().__init__(n=4, sigma=6.0)
        self.crefs = [cook_refs(references) for references in corpus]
        self.compute_doc_freq()
        self.corpus_log_size = np.log(float(len(self.crefs)))

    @property
    def ref_len(self):
        return getattr(self, "corpus_log_size", None)

    @ref_len.setter
    def ref_len(self, _):
        pass

    def score(self, cooked_references, captions):
        """CIDEr-D of each tokenised caption against its image's cooked references."""
        self.crefs, self.ctest = cooked_references, [cook_test(caption) for caption in captions]
        return [float(value) for value in self.compute_cider()]


class CiderReward:
    """reward(image keys, captions, ended): CIDEr-D of each caption against the references of its image in the
    training data, and 0 for a caption that did not end within the token budget (its text is a fragment: rewarding
    it as complete teaches captions that stop mid-phrase)."""

    def __init__(self, references, use_java):
        """references: {image key: [reference captions]}, all of the training data's."""
        self.use_java = use_java
        tokenized = tokenize_all(references, use_java)
        self.scorer = CorpusCiderD(tokenized.values())
        self.cooked = dict(zip(tokenized, self.scorer.crefs))

    def __call__(self, image_keys, captions, ended):
        tokenized = tokenize_all({number: [caption] for number, caption in enumerate(captions)}, self.use_java)
        scores = self.scorer.score([self.cooked[key] for key in image_keys],
                                   [tokenized[number][0] for number in range(len(captions))])
        return [score if complete else 0.0 for score, complete in zip(scores, ended)]
