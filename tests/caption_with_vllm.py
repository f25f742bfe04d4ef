"""Caption photos with vLLM (its CPU build, run in its own environment) as a server would: a merged model folder as
it is, or the base model with train.py's adapter through LoRARequest. Each photo is given at its own size and shape.

    python caption_with_vllm.py MODEL PROMPT IMAGE [IMAGE ...] [--adapter FOLDER] [--mm_processor_kwargs JSON]
                                [--dtype bfloat16]

prints one JSON object: {"vllm": version, "captions": {image: {"caption", "image_tokens"}}}.
"""
import argparse
import json

import vllm
from PIL import Image
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("prompt")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--adapter")
    parser.add_argument("--mm_processor_kwargs", type=json.loads, default=None)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    lora = {"enable_lora": True, "max_lora_rank": 64} if args.adapter else {}
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=512, enforce_eager=True,
              limit_mm_per_prompt={"image": 1},
              mm_processor_kwargs=args.mm_processor_kwargs, **lora)
    adapter = LoRARequest("adapter", 1, args.adapter) if args.adapter else None
    image_pad = llm.get_tokenizer().convert_tokens_to_ids("<|image_pad|>")
    captions = {}
    for path in args.images:
        messages = [{"role": "user", "content": [{"type": "image_pil", "image_pil": Image.open(path).convert("RGB")},
                                                 {"type": "text", "text": args.prompt}]}]
        [output] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=16), lora_request=adapter)
        captions[path] = {"caption": output.outputs[0].text.strip(),
                          "image_tokens": output.prompt_token_ids.count(image_pad)}
    print(json.dumps({"vllm": vllm.__version__, "captions": captions}))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this file
    main()
