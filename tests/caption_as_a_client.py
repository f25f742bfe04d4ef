"""Caption images with a model folder as an outside reader does, in whatever transformers is importable:
AutoModelForImageTextToText with AutoProcessor, and pipeline("image-text-to-text"), each with only the folder's
own settings (no image_size, no resizing by us): each photo is given at its own size and shape.

    python caption_as_a_client.py MODEL_FOLDER PROMPT IMAGE [IMAGE ...]     # prints one JSON object
"""
import json
import sys

import torch
import transformers
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

folder, prompt, *image_paths = sys.argv[1:]
processor = AutoProcessor.from_pretrained(folder)
model = AutoModelForImageTextToText.from_pretrained(folder)
captioner = pipeline("image-text-to-text", model=folder)
captions = {}
for image_path in image_paths:
    image = Image.open(image_path).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    model_caption = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    pipeline_caption = captioner(text=messages, max_new_tokens=16, do_sample=False, return_full_text=False)
    captions[image_path] = {"image_grid_thw": inputs["image_grid_thw"].tolist(), "model": model_caption.strip(),
                            "pipeline": pipeline_caption[0]["generated_text"].strip()}

print(json.dumps({"transformers": transformers.__version__, "captions": captions}))
