"""Training samples made on the fly from the conversation JSON: the prompt through the chat template, the image
resized as served, labels on the caption and its closing token alone; and the collator that batches them."""
from PIL import Image
from tqdm import tqdm

from captioning.chat import END_OF_TURN, IGNORE_INDEX, build_messages
from captioning.errors import PipelineError
from captioning.images import load_image, upright_size

# per image: joined across a batch, never padded
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_features", "image_deepstack_features")


def answer_token_ids(processor, prompt, caption):
    """The tokens the model must produce: the caption as the chat template renders it, up to END_OF_TURN."""
    messages = build_messages(None, prompt, caption)
    prompt_text = processor.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    full_text = processor.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text) or END_OF_TURN not in full_text[len(prompt_text):]:
        raise PipelineError("the processor's chat template does not render a Qwen-VL assistant turn")
    answer = full_text[len(prompt_text):]
    answer = answer[: answer.index(END_OF_TURN) + len(END_OF_TURN)]
    return processor.tokenizer(answer, add_special_tokens=False)["input_ids"]


def prompt_inputs(processor, image, prompt):
    """The processor's tensors for the user turn and the opening of the assistant's answer."""
    prompt_text = processor.apply_chat_template(build_messages(image, prompt), add_generation_prompt=True, tokenize=False)
    return processor(text=[prompt_text], images=[image], return_tensors="pt")


def encode_sample(processor, image, prompt, answer_ids):
    """Token ids, labels and image tensors for one sample: only the answer (caption and END_OF_TURN) is supervised."""
    return with_answer(prompt_inputs(processor, image, prompt), answer_ids)


def with_answer(inputs, answer_ids):
    """The prompt's tensors with the answer appended to each per-token row; labels supervise only the answer."""
    import torch

    answer = torch.tensor(answer_ids)
    # per-token rows get the answer appended: its ids, mask 1, and 0 in extras such as mm_token_type_ids (text)
    answer_rows = {"input_ids": answer, "attention_mask": torch.ones_like(answer)}
    sample = {
        key: value if key in IMAGE_KEYS else torch.cat([value[0], answer_rows.get(key, torch.zeros_like(answer))])
        for key, value in inputs.items()
    }
    sample["labels"] = torch.cat([torch.full_like(inputs["input_ids"][0], IGNORE_INDEX), answer])
    return sample


class CaptionDataset:
    """Samples encoded on the fly, after dropping those whose image is missing, unreadable or of a shape no processor
    takes, and those that are too long. Each image's size comes from its header alone (geometry), so its tokens are
    counted without decoding it. Images are preprocessed in every step that uses them, unless image_features holds
    their vision features (encode_images)."""

    def __init__(self, samples, processor, geometry, max_length, show_progress=True):
        self.processor, self.geometry = processor, geometry
        self.image_sizes = {}  # image path -> the size it is resized to
        self.prompt_tensors = {}  # (prompt, image size) -> the prompt's tensors, the same for every image of that size
        self.samples, self.answers, self.lengths, self.skipped = [], [], [], []
        for sample in tqdm(samples, desc="building the training set", unit="sample", disable=not show_progress):
            path, prompt = sample["image_path"], sample["prompt"]
            try:
                if path not in self.image_sizes:
                    self.image_sizes[path] = geometry.size_of(*upright_size(path), path)
            except PipelineError as error:
                self.skipped.append(str(error))
                continue
            key = (prompt, self.image_sizes[path])
            if key not in self.prompt_tensors:
                self.prompt_tensors[key] = prompt_inputs(processor, Image.new("RGB", key[1]), prompt)
            answer = answer_token_ids(processor, prompt, sample["caption"])
            length = self.prompt_tensors[key]["input_ids"].shape[1] + len(answer)
            if length > max_length:
                self.skipped.append(f"{length} tokens > max_length={max_length}: {path}")
                continue
            self.samples.append(sample)
            self.answers.append(answer)
            self.lengths.append(length)
        self.image_sizes = {path: self.image_sizes[path] for path in self.image_paths()}  # of the samples kept
        self.image_features = None  # image path -> the vision tower's output (encode_images), once cached

    def image_paths(self):
        return list(dict.fromkeys(sample["image_path"] for sample in self.samples))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        if self.image_features is None:
            image = load_image(sample["image_path"], self.geometry)
            return encode_sample(self.processor, image, sample["prompt"], self.answers[index])
        prompt_tensors = self.prompt_tensors[(sample["prompt"], self.image_sizes[sample["image_path"]])]
        inputs = {key: value for key, value in prompt_tensors.items() if key != "pixel_values"}
        return with_answer({**inputs, **self.image_features[sample["image_path"]]}, self.answers[index])


class CaptionCollator:
    """Pads token sequences on the right and joins the images: pixel_values (or cached image_features) are
    concatenated rows and image_grid_thw is stacked, so images of different sizes each keep their own row count.
    Hands cached image features to the model as the family's output object, and asks for logits only where the loss
    needs them."""

    def __init__(self, pad_token_id, family):
        self.pad_values = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}
        self.family = family

    def __call__(self, samples):
        import torch

        from captioning.feature_cache import pass_cached_image_features

        batch = {}
        longest = max(len(sample["input_ids"]) for sample in samples)
        for key in samples[0]:
            values = [sample[key] for sample in samples]
            if key in IMAGE_KEYS:
                batch[key] = torch.cat(values)
            else:
                padded = torch.full((len(values), longest), self.pad_values.get(key, 0), dtype=values[0].dtype)
                for row, value in enumerate(values):
                    padded[row, : len(value)] = value
                batch[key] = padded
        return keep_caption_logits_only(pass_cached_image_features(batch, self.family))


def keep_caption_logits_only(batch):
    """Mark the positions whose logits the loss needs (logits_to_keep) with their targets (shift_labels): elsewhere
    the vocabulary-wide projection would be computed and thrown away."""
    import torch

    next_labels = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    batch["logits_to_keep"] = next_labels != IGNORE_INDEX
    batch["shift_labels"] = next_labels[batch["logits_to_keep"]]
    return batch
