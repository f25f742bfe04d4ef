"""Self-critical training (train_rl.py): several captions sampled per image, each rewarded, and the adapter pushed
towards those above their group's mean reward and away from those below (the mean of the group as baseline).

Per step: the vision tower encodes each image once; the k captions of an image are sampled in one generate call
(num_return_sequences) from those features; a caption is its tokens up to and including the first <|im_end|>, or all
max_new_tokens of them when it never ends (rewarded nothing); one forward pass scores every caption's tokens."""
from collections import defaultdict

import torch
from transformers import GenerationConfig, Trainer

from captioning.chat import END_OF_TURN, build_messages
from captioning.feature_cache import feature_rows, sample_features
from captioning.generation import active_adapter
from captioning.images import load_image
from captioning.quantization import eval_mode_between_training_steps
from captioning.training_samples import CaptionCollator, with_answer


def tokens_no_caption_holds(tokenizer):
    """Ids sampling must never emit: the special tokens but <|im_end|> (a sampled <|image_pad|> breaks the forward
    that scores the caption) and the tags of a thinking block."""
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    special = {number for number, token in tokenizer.added_tokens_decoder.items() if token.special}
    vocabulary = tokenizer.get_vocab()
    thinking = {vocabulary[tag] for tag in ("<think>", "</think>") if tag in vocabulary}
    return sorted((special | thinking) - {end})


def group_advantages(rewards, group_size, scale):
    """Each reward minus the mean of its group (an image's captions, consecutive), divided by the group's spread
    when scale: a group whose rewards are all equal gets 0 everywhere, never a NaN."""
    groups = rewards.view(-1, group_size)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (groups.std(dim=1, keepdim=True) + 1e-4)
    return advantages.flatten()


class PromptCollator:
    """A batch of images as the prompts to sample captions of: each image loaded at training's size, the chat
    template with the prompt, left-padded so that generation continues every row at its end."""

    def __init__(self, processor, geometry, prompt):
        self.processor, self.geometry, self.prompt = processor, geometry, prompt

    def __call__(self, samples):
        paths = [sample["image_path"] for sample in samples]
        images = [load_image(path, self.geometry) for path in paths]
        texts = [self.processor.apply_chat_template(build_messages(image, self.prompt), add_generation_prompt=True,
                                                    tokenize=False) for image in images]
        inputs = self.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
        return {**inputs, "image_paths": paths}


class SelfCriticalTrainer(Trainer):
    """Trainer whose loss is the policy gradient of sampled captions: -(advantage x the caption's log-probability),
    averaged over the captions, plus beta x the KL to the starting adapter (adapter "reference") when beta > 0.
    evaluate() captions the held-out images greedily (held_out: model -> metrics) and logs their CIDEr-D, before the
    first step and every eval_steps: on the main process, or on all of them when weights_split (DeepSpeed ZeRO-3
    holds a slice of each weight in each process, so all of them generate together)."""

    def __init__(self, *args, reward, num_generations, temperature, max_new_tokens, scale_rewards, beta, family,
                 held_out=None, weights_split=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # so that Trainer averages the loss over gradient accumulation steps
        self.reward, self.num_generations, self.temperature = reward, num_generations, temperature
        self.scale_rewards, self.beta, self.held_out, self.weights_split = scale_rewards, beta, held_out, weights_split
        tokenizer = self.processing_class.tokenizer
        self.end_of_turn = tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self.sampling = GenerationConfig(
            do_sample=True, temperature=temperature, top_k=0, top_p=1.0, num_return_sequences=num_generations,
            max_new_tokens=max_new_tokens, eos_token_id=self.end_of_turn, pad_token_id=tokenizer.pad_token_id,
            suppress_tokens=tokens_no_caption_holds(tokenizer), use_cache=True)
        self.collator = CaptionCollator(tokenizer.pad_token_id, family)
        self.logged = defaultdict(list)  # metrics since the last log, averaged into it
        self.evaluated_at_start = False

    def sampled_captions(self, policy, inputs, features):
        """[token ids] of each sampled caption, num_generations per image in image order, cut after <|im_end|>."""
        prompts = {key: value for key, value in inputs.items() if key != "pixel_values"}
        output = policy.generate(**prompts, mm_encoder_outputs={"image": features}, generation_config=self.sampling)
        captions = []
        for row in output[:, inputs["input_ids"].shape[1]:].tolist():
            captions.append(row[:row.index(self.end_of_turn) + 1] if self.end_of_turn in row else row)
        return captions

    def scored_batch(self, inputs, image_rows, captions):
        """The prompt of each caption's image (without its padding) and the caption, batched as training batches
        samples: labels on the caption, the image's cached features."""
        samples = []
        for number, caption in enumerate(captions):
            image = number // self.num_generations
            kept = inputs["attention_mask"][image].bool()
            prompt = {key: inputs[key][image][kept][None]
                      for key in ("input_ids", "attention_mask", "mm_token_type_ids") if key in inputs}
            prompt["image_grid_thw"] = inputs["image_grid_thw"][image:image + 1]
            samples.append(with_answer({**prompt, **sample_features(image_rows[image])}, caption))
        return {key: value.to(self.args.device) if isinstance(value, torch.Tensor) else value
                for key, value in self.collator(samples).items()}

    def token_log_probs(self, model, batch):
        """(log-probability of each caption token at the sampling temperature, the caption it belongs to)."""
        targets = batch.pop("shift_labels")
        batch.pop("labels")
        logits = model(**batch).logits.float() / self.temperature
        log_probs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
        return log_probs, batch["logits_to_keep"].nonzero()[:, 0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        paths = inputs.pop("image_paths")
        policy = self.accelerator.unwrap_model(model)
        eval_mode_between_training_steps(policy)  # no dropout: the captions are scored by the policy that sampled them
        with torch.no_grad():
            features = policy.get_base_model().get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            image_rows = feature_rows(features)  # taken before generate, which repeats the features in place
            captions = self.sampled_captions(policy, inputs, features)
        texts = self.processing_class.batch_decode(captions, skip_special_tokens=True)
        ended = [caption[-1:] == [self.end_of_turn] for caption in captions]
        image_keys = [path for path in paths for _ in range(self.num_generations)]
        rewards = torch.tensor(self.reward(image_keys, [text.strip() for text in texts], ended))
        advantages = group_advantages(rewards, self.num_generations, self.scale_rewards).to(self.args.device)

        batch = self.scored_batch(inputs, image_rows, captions)
        reference_batch = dict(batch) if self.beta else None
        log_probs, caption_of_token = self.token_log_probs(model, batch)
        loss = -(advantages[caption_of_token] * log_probs).sum() / len(captions)
        if self.beta:
            with torch.no_grad(), active_adapter(policy, "reference"):
                reference_log_probs, _ = self.token_log_probs(policy, reference_batch)
            # the k3 estimator of KL(policy || reference), per token, as GRPO computes it
            difference = reference_log_probs - log_probs
            kl = torch.exp(difference) - difference - 1
            loss = loss + self.beta * kl.mean()
            self.logged["kl"].append(kl.mean().item())
        self.logged["reward"].append(rewards.mean().item())
        # within each image's captions: near 0 they are alike and teach nothing
        self.logged["reward_spread"].append(rewards.view(-1, self.num_generations).std(dim=1).mean().item())
        self.logged["ended"].append(sum(ended) / len(ended))
        self.logged["caption_words"].append(sum(len(text.split()) for text in texts) / len(texts))
        return loss

    def log(self, logs, *args, **kwargs):
        """Add the means of the rollout metrics since the last log, over all processes, to a training log."""
        if "loss" in logs and self.logged:
            means = torch.tensor([sum(values) / len(values) for values in self.logged.values()],
                                 device=self.args.device)
            logs.update(zip(self.logged, self.accelerator.reduce(means, "mean").tolist()))
            self.logged.clear()
        super().log(logs, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.state.global_step == 0 and self.held_out and not self.evaluated_at_start:
            self.evaluated_at_start = True
            self.evaluate()  # the starting point of the held-out curve (a resumed run has it already)
        return super().training_step(model, inputs, num_items_in_batch)

    def evaluate(self, *args, **kwargs):
        """Greedy captions of the held-out images and their CIDEr-D (as compare.py scores them), logged."""
        generates = self.is_world_process_zero() or self.weights_split
        metrics = self.held_out(self.accelerator.unwrap_model(self.model)) if generates else {}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics
