"""Run train_rl.py with its reward replaced by noise, the learning test's control:

    python tests/rewarded_by_noise.py train_rl.py --name=value ...

Each caption gets a reward drawn uniformly from 0 to 5 (seeded), whatever it says: a rise in CIDEr-D that this run
reaches too is not the reward's doing.
"""
import os
import random
import runpy
import sys

script, *settings = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))

import captioning.caption_reward  # noqa: E402  (found beside the script, as the script finds it)


class NoiseReward:
    def __init__(self, references, use_java):
        self.draws = random.Random(0)

    def __call__(self, image_keys, captions, ended):
        return [self.draws.uniform(0, 5) for _ in captions]


captioning.caption_reward.CiderReward = NoiseReward
sys.argv = [script, *settings]
runpy.run_path(script, run_name="__main__")
