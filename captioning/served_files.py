"""The processor and config files that other tools read (transformers 4, vLLM, llama.cpp), with training's image
size pinned."""

import json
import os
import shutil

from captioning.files import write_json


def pin_image_size(processor, geometry):
    """Make the processor resize as training did (ImageGeometry: at most image_size² pixels, at least one merged
    patch), so that a client that never heard of image_size (pipeline, vLLM, llama.cpp) computes training's size
    from a full-size photo, and an image load_image already resized is left as it is."""
    processor.image_processor.size = {"shortest_edge": geometry.side_multiple ** 2,
                                      "longest_edge": geometry.image_size ** 2}


def save_processor(processor, folder, geometry, base_model):
    """The processor, tokenizer and chat template in the files that this and older readers look for, with the
    training geometry pinned. base_model: the folder of the model trained on, which holds the slow tokenizer's
    files that transformers 5 no longer writes."""
    pin_image_size(processor, geometry)
    processor.save_pretrained(folder)
    # transformers 5 keeps the image processor inside processor_config.json; transformers 4 reads only this file
    size = processor.image_processor.size
    write_json(os.path.join(folder, "preprocessor_config.json"),
               {**processor.image_processor.to_dict(), "min_pixels": size["shortest_edge"],
                "max_pixels": size["longest_edge"], "processor_class": type(processor).__name__})
    for name in ("vocab.json", "merges.txt"):
        if os.path.isfile(os.path.join(base_model, name)):
            shutil.copyfile(os.path.join(base_model, name), os.path.join(folder, name))


def add_config_fields_for_transformers_4(folder):
    """Write what transformers 4 (and the tools built on it) read from config.json and transformers 5 moved: the
    multimodal rope as rope_scaling beside rope_parameters (without it generation fails), and the tied word
    embeddings in text_config (without it the output layer is left random)."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as file:
        config = json.load(file)
    text_config = config.get("text_config", config)
    rope = text_config.get("rope_parameters", {})
    if "mrope_section" in rope:
        # Qwen2-VL and Qwen2.5-VL name it type mrope there; Qwen3-VL's interleaved one keeps its own fields
        scaling = ({key: value for key, value in rope.items() if key != "rope_theta"} if rope.get("mrope_interleaved")
                   else {"type": "mrope", "mrope_section": rope["mrope_section"]})
        for section in (config, text_config):
            section["rope_scaling"] = scaling
            section["rope_theta"] = rope["rope_theta"]
    if "tie_word_embeddings" in config:
        text_config.setdefault("tie_word_embeddings", config["tie_word_embeddings"])
    write_json(path, config)


def merged_folder(output_dir):
    """Where merge.py writes the merged model of a training run's output_dir, unless told otherwise."""
    return os.path.normpath(output_dir) + "-merged"


def gguf_folder(merged_dir):
    """Where export_gguf.py writes the GGUF files of a merged folder, unless told otherwise."""
    return os.path.normpath(merged_dir).removesuffix("-merged") + "-gguf"
