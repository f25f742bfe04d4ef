"""Captions from a model: greedy generation in batches, files that do not load skipped, base and fine-tuned side by
side."""

from contextlib import contextmanager, suppress

from captioning.checkpoints import trained_model
from captioning.chat import END_OF_TURN, build_messages
from captioning.images import loaded_images, trained_geometry
from captioning.served_files import pin_image_size
from captioning.models import load_model_and_processor


class BaseAndFineTuned:
    """The base model and the fine-tuned one, to caption the same images with both. With an adapter the base model
    is the adapter switched off, so nothing loads twice; a merged model is loaded beside the model it came from.
    quantization: both loaded in 4 or 8 bits, or none."""

    def __init__(self, model, checkpoint, output_dir, compute, quantization="none"):
        self.checkpoint_dir, self.run_config, fine_tuned = trained_model(model, checkpoint, output_dir)
        self.started_from = self.run_config.get("started_from") if self.checkpoint_dir else None
        self.fine_tuned, self.processor = load_model_and_processor(fine_tuned, compute, on_device=True,
                                                                   quantization=quantization)
        if self.checkpoint_dir:
            from peft import PeftModel

            self.fine_tuned = self.base = PeftModel.from_pretrained(self.fine_tuned, self.checkpoint_dir)
            if self.started_from:  # train.py's adapter that train_rl.py trained further, beside it
                self.fine_tuned.load_adapter(self.started_from, adapter_name="started_from")
        else:
            self.base, _ = load_model_and_processor(self.run_config["model"], compute, on_device=True,
                                                    quantization=quantization)
        self.fine_tuned.eval()
        self.names = {"base": self.run_config["model"], "fine_tuned": self.checkpoint_dir or fine_tuned}

    def caption(self, which, paths, max_new_tokens, batch_size, **options):
        """caption_files with the "base" or the "fine_tuned" model (or, for a train_rl.py run, the "started_from"
        adapter), at training's prompt and image geometry."""
        model = self.base if which == "base" else self.fine_tuned
        with model.disable_adapter() if which == "base" and self.checkpoint_dir else \
                active_adapter(model, "started_from") if which == "started_from" else suppress():
            return caption_files(model, self.processor, paths, trained_geometry(self.run_config),
                                 self.run_config["prompt"], max_new_tokens, batch_size, **options)


@contextmanager
def active_adapter(model, name):
    """One of a peft model's adapters active (frozen), then the default one again, trainable or not as before."""
    default_trains = any(parameter.requires_grad for parameter in model.parameters())
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter("default", inference_mode=not default_trains)


def caption_files(model, processor, paths, geometry, prompt, max_new_tokens, batch_size, description="captioning",
                  show_progress=True, skipped=None):
    """[(path, caption)] for every image that loads, read batch by batch as the model needs them rather than all
    first; each one that does not load is named and skipped (and added to the list skipped, if given, with why)."""
    from tqdm import tqdm

    captioned = []
    paths = list(paths)
    pin_image_size(processor, geometry)  # so that it leaves the images load_image resized as they are
    with tqdm(total=len(paths), desc=description, unit="image", disable=not show_progress) as progress:
        for start in range(0, len(paths), batch_size):
            loaded, failed = loaded_images(paths[start:start + batch_size], geometry)
            for path, why in failed:
                progress.write(f"skipped: {why}")
            if skipped is not None:
                skipped += failed
            captions = generate_captions(model, processor, [image for _, image in loaded], prompt, max_new_tokens,
                                         batch_size, show_progress=False) if loaded else []
            captioned += [(path, caption) for (path, _), caption in zip(loaded, captions)]
            progress.update(len(paths[start:start + batch_size]))
    return captioned


def generate_captions(model, processor, images, prompt, max_new_tokens, batch_size, show_progress=True):
    """Greedy captions for a list of PIL images, generated batch_size at a time with left padding."""
    import torch
    from tqdm import tqdm
    from transformers import GenerationConfig

    tokenizer = processor.tokenizer
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_cache=True,
        eos_token_id=tokenizer.convert_tokens_to_ids(END_OF_TURN),
        pad_token_id=tokenizer.pad_token_id,
    )
    captions = []
    with tqdm(total=len(images), desc="captioning", unit="image", disable=not show_progress) as progress:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            texts = [
                processor.apply_chat_template(build_messages(image, prompt), add_generation_prompt=True, tokenize=False)
                for image in batch
            ]
            inputs = processor(text=texts, images=batch, padding=True, padding_side="left", return_tensors="pt")
            inputs = inputs.to(model.device)
            # a bf16 or fp16 base model's adapter is held in fp32 (peft upcasts it): autocast keeps its matmuls in
            # the base model's precision
            with torch.inference_mode(), torch.autocast(model.device.type, dtype=model.dtype,
                                                        enabled=model.dtype != torch.float32):
                output = model.generate(**inputs, generation_config=generation_config)
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            captions += [caption.strip() for caption in processor.batch_decode(new_tokens, skip_special_tokens=True)]
            progress.update(len(batch))
    return captions
