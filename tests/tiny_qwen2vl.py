"""Build a tiny random-weight Qwen2-VL with the real transformers classes, for offline tests.

The folder it writes loads with the same `from_pretrained` calls as Qwen/Qwen2-VL-2B-Instruct.
"""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

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
TINY_VISION = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2)


def build_tiny_qwen2vl(folder, seed=0, text=TINY_TEXT, vision=TINY_VISION, vocab_size=None, dtype=None):
    """Write a random-weight Qwen2-VL (model, tokenizer, processor, chat template) to `folder`: tiny by default,
    or of the shape that `text` and `vision` (Qwen2VLConfig fields) and vocab_size give."""
    import torch

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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
    return folder
