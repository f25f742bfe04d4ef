"""Build a tiny random-weight Qwen2-VL with the real transformers classes, for offline tests.

The folder it writes is laid out as Qwen/Qwen2-VL-2B-Instruct is on the hub (a flat config with rope_scaling,
preprocessor_config.json, Qwen2Tokenizer files), so it loads with the same calls in any transformers version.
"""
import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2-VL's chat template, reduced to what captioning uses (images and text).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "You are a helpful assistant.", "system user assistant", "COCO Yes:",
    "a red square on a table", "a green field under the sky", "a blue boat on the water",
    "a yellow cat sleeping", "A man riding a wave on top of a surfboard.",
    "Two dogs play with a frisbee in the park, near a bench.",
    "the quick brown fox jumps over the lazy dog 0123456789 ,.;:'\"!?()-",
]


TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048,
                 rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
TINY_VISION = dict(depth=3, embed_dim=32, hidden_size=64, num_heads=2)  # llama.cpp converts depths above 2


def build_tiny_qwen2vl(folder, seed=0, text=TINY_TEXT, vision=TINY_VISION, vocab_size=None, dtype=None):
    """Write a random-weight Qwen2-VL (model, tokenizer, processor, chat template) to `folder`: tiny by default,
    or of the shape that `text` and `vision` (Qwen2VLConfig fields) and vocab_size give."""
    import torch

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()  # Qwen2Tokenizer's normalizer and pre-tokenizer, so that its slow files
    bpe.pre_tokenizer = pre_tokenizers.Sequence([  # ... and tokenizer.json split text alike
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(CORPUS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=1280 * 28 * 28)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab_size or len(tokenizer),
            tie_word_embeddings=True,
            **text,
            bos_token_id=token_id("<|endoftext|>"),
            eos_token_id=token_id("<|im_end|>"),
            pad_token_id=token_id("<|endoftext|>"),
        ),
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **vision),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config.eos_token_id = token_id("<|im_end|>")
    model.generation_config.pad_token_id = token_id("<|endoftext|>")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    lay_out_as_on_the_hub(folder, bpe)
    return folder


def lay_out_as_on_the_hub(folder, bpe):
    """Rewrite what transformers 5 saved into the hub's layout (written by transformers 4): what users download."""
    def rewrite(name, change):
        with open(os.path.join(folder, name)) as file:
            content = json.load(file)
        with open(os.path.join(folder, name), "w") as file:
            json.dump(change(content), file, indent=2)

    def flat_config(config):
        text = config.pop("text_config")
        rope = text.pop("rope_parameters")
        for name in ("model_type", "layer_types", "dtype"):
            text.pop(name, None)
        for name in ("model_type", "rope_parameters"):
            config["vision_config"].pop(name)
        dtype = config.pop("dtype")
        return {**config, **text, "torch_dtype": dtype, "rope_theta": rope["rope_theta"],
                "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}

    def qwen2_tokenizer_config(config):
        added = {str(bpe.token_to_id(token)): {"content": token, "lstrip": False, "normalized": False,
                                               "rstrip": False, "single_word": False, "special": True}
                 for token in SPECIAL_TOKENS}
        return {**config, "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "errors": "replace",
                "bos_token": None, "clean_up_tokenization_spaces": False, "split_special_tokens": False,
                "model_max_length": 32768}

    rewrite("config.json", flat_config)
    rewrite("tokenizer_config.json", qwen2_tokenizer_config)
    bpe.model.save(folder)  # vocab.json and merges.txt, which Qwen2Tokenizer's slow form reads
    with open(os.path.join(folder, "processor_config.json")) as file:
        image_processor = json.load(file)["image_processor"]
    size = image_processor.pop("size")
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as file:
        json.dump({**image_processor, "min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"],
                   "processor_class": "Qwen2VLProcessor"}, file, indent=2)
    with open(os.path.join(folder, "chat_template.jinja")) as file:
        chat_template = file.read()
    with open(os.path.join(folder, "chat_template.json"), "w") as file:
        json.dump({"chat_template": chat_template}, file)
    for name in ("processor_config.json", "chat_template.jinja"):
        os.remove(os.path.join(folder, name))
