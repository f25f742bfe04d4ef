"""Benchmark this project's code path against a faithful re-implementation of the recipe's, in one run.

    .venv/bin/python bench/bench.py                     # CPU: a scaled-down Qwen2-VL; CUDA: the real 2B shape
    .venv/bin/python bench/bench.py --images=96 --epochs=1

Three measurements, each path in its own process so that peak memory is its own:
1. data preparation, from data_vl.json to the first training batch: wall time and peak RSS;
2. training, the recipe's 2 epochs: samples/s and tokens/s over the steps after warm-up (this project's one-off
   encoding of the images with the frozen vision tower is counted in), peak memory, the FLOPs of a step counted by
   torch's FlopCounterMode on the first step, and on CUDA the model FLOPs utilisation from them (over the timed
   steps, the encoding left out) with peak GPU memory allocated and reserved after the encoding and memory probe;
3. captioning: images/s of batched generation against one image at a time, whether the captions agree, and the
   time of the image-and-prompt pass alone (generation stopped after one token);
4. reinforcement: a train_rl.py step (8 captions sampled per image) against a train.py step on the same images.
The model has random weights (speed does not depend on their values), so nothing is downloaded. Prints a table
and writes bench/results.json.
"""
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO]

from captioning.errors import PipelineError  # noqa: E402
from captioning.files import write_json  # noqa: E402
from captioning.models import FAMILIES, checked_image_size  # noqa: E402
from captioning.scripts import run_script  # noqa: E402
from captioning.settings import parse_settings  # noqa: E402

# ----------------------------------------------------------------------------- settings
images = 496  # training images at image_size x image_size, as in the recipe's published run
image_size = 0  # 0: the model family's default, 280 (Qwen2-VL, Qwen2.5-VL) or 288 (Qwen3-VL, Qwen3.5)
epochs = 2  # training runs the recipe's 2 epochs over the images
warmup_steps = 2  # optimizer steps left out of the timing
caption_images = 16
max_new_tokens = 24
model_size = "auto"  # auto: 2b on CUDA, small on CPU | 2b (Qwen2-VL-2B's shape) | qwen2.5-vl-3b | qwen3-vl-2b |
# qwen3.5-0.8b | qwen3.5-2b | qwen3.5-4b | small
output = "bench/results.json"
data_rows = ""  # e.g. 1000,10000,100000: measure the data steps at those row counts instead, and fetching
fetch_images = 200  # the data part: images fetched from a local host, with one connection and with fetch_workers
fetch_workers = 16
fetch_latency = 0.1  # seconds that host waits before each answer: a round trip to a distant image host
data_output = "bench/data_results.json"
part = ""  # internal: the one measurement a child process runs
work_dir = ""  # internal: the shared data folder
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------

# What Qwen3.5's 0.8B, 2B and 4B share: heads of 256 (a quarter of each rotated), linear-attention heads of 128, and
# (the 2B's taken as the 4B's, its own config not seen offline) a vision tower 24 deep and 1024 wide
QWEN35_TEXT = dict(head_dim=256, linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                   linear_conv_kernel_dim=4, rms_norm_eps=1e-6, max_position_embeddings=262144,
                   rope_parameters={"rope_type": "default", "mrope_section": [11, 11, 10], "mrope_interleaved": True,
                                    "rope_theta": 1e7, "partial_rotary_factor": 0.25})
QWEN35_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, num_position_embeddings=2304)

# The published architectures (config.json) of Qwen2-VL-2B-, Qwen2.5-VL-3B-, Qwen3-VL-2B-Instruct and Qwen3.5's
# dense 0.8B, 2B and 4B, and a scaled-down Qwen2-VL for CPUs
SIZES = {
    "2b": dict(family="qwen2_vl",
               text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
               vision=dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4),
               vocab_size=151936),
    "qwen2.5-vl-3b": dict(
        family="qwen2_5_vl",
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128000, max_window_layers=70,
                  rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        vocab_size=151936),
    "qwen3-vl-2b": dict(
        family="qwen3_vl",
        text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=262144,
                  rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True,
                                   "rope_theta": 5e6}),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                    num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
        vocab_size=151936),
    # Qwen3.5's text models: Gated DeltaNet layers, one full-attention layer in four (the config's default pattern)
    "qwen3.5-0.8b": dict(family="qwen3_5", text=dict(QWEN35_TEXT, hidden_size=1024, intermediate_size=3584,
                                                     num_hidden_layers=24, num_attention_heads=8,
                                                     num_key_value_heads=2, linear_num_value_heads=16),
                         vision=dict(QWEN35_VISION, depth=12, hidden_size=768, intermediate_size=3072, num_heads=12,
                                     out_hidden_size=1024),
                         vocab_size=248320),
    "qwen3.5-2b": dict(family="qwen3_5", text=dict(QWEN35_TEXT, hidden_size=2048, intermediate_size=6144,
                                                   num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
                                                   linear_num_value_heads=16),
                       vision=dict(QWEN35_VISION, out_hidden_size=2048), vocab_size=248320),
    "qwen3.5-4b": dict(family="qwen3_5", text=dict(QWEN35_TEXT, hidden_size=2560, intermediate_size=9216,
                                                   num_hidden_layers=32, num_attention_heads=16, num_key_value_heads=4,
                                                   linear_num_value_heads=32),
                       vision=dict(QWEN35_VISION, out_hidden_size=2560), vocab_size=248320),
    "small": dict(family="qwen2_vl",
                  text=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=32768,
                            rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}),
                  vision=dict(depth=4, embed_dim=256, hidden_size=256, num_heads=4, mlp_ratio=4),
                  vocab_size=4096),
}
BATCH, ACCUMULATION = 4, 4  # the recipe's; the fast path takes the same 16 samples per step as one micro-batch
RL_CAPTIONS = 8  # train_rl.py's num_generations
CAPTIONS = ["A man riding a wave on top of a surfboard.", "Two dogs play with a frisbee in the park, near a bench.",
            "A red bus drives down a busy street past tall buildings.", "A plate of food with broccoli and rice."]


# ----------------------------------------------------------------------------- setup (parent process)

def prepare(cfg, folder):
    """Random-noise JPEGs, data_vl.json in the recipe's format, and a random-weight model folder."""
    import numpy
    from PIL import Image

    from testkit.tiny_models import BUILDERS

    rng = numpy.random.default_rng(0)
    entries = []
    for number in range(cfg.images):
        path = os.path.join(folder, "images", f"{number}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (cfg.image_size, cfg.image_size, 3), dtype=numpy.uint8)).save(path)
        entries.append({"id": f"identity_{number + 1}", "conversations": [
            {"from": "user", "value": f"COCO Yes: <|vision_start|>{path}<|vision_end|>"},
            {"from": "assistant", "value": CAPTIONS[number % len(CAPTIONS)]}]})
    write_json(os.path.join(folder, "data_vl.json"), entries)
    import torch

    size = SIZES[cfg.model_size]
    BUILDERS[size["family"]](os.path.join(folder, "model"), text=size["text"], vision=size["vision"],
                             vocab_size=size["vocab_size"], dtype=torch.bfloat16 if cfg.model_size != "small" else None)


# ----------------------------------------------------------------------------- the recipe's path

def recipe_process_func(example, processor, image_size):
    """The recipe's preprocessing, step for step: pixel values become Python lists stored by datasets.map,
    and the labels end with the pad token. One addition: mm_token_type_ids, which transformers 5 requires."""
    import torch
    from PIL import Image

    tokenizer = processor.tokenizer
    user, assistant = example["conversations"]
    file_path = user["value"].split("<|vision_start|>")[1].split("<|vision_end|>")[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": file_path, "resized_height": image_size,
                                              "resized_width": image_size}, {"type": "text", "text": "COCO Yes:"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_inputs = [Image.open(file_path).convert("RGB").resize((image_size, image_size))]  # process_vision_info
    inputs = processor(text=[text], images=image_inputs, padding=True, return_tensors="pt")
    inputs = {key: value.tolist() for key, value in inputs.items()}
    response = tokenizer(assistant["value"], add_special_tokens=False)
    input_ids = inputs["input_ids"][0] + response["input_ids"] + [tokenizer.pad_token_id]
    attention_mask = inputs["attention_mask"][0] + response["attention_mask"] + [1]
    labels = [-100] * len(inputs["input_ids"][0]) + response["input_ids"] + [tokenizer.pad_token_id]
    token_types = inputs["mm_token_type_ids"][0] + [0] * (len(input_ids) - len(inputs["input_ids"][0]))
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask),
            "labels": torch.tensor(labels), "pixel_values": torch.tensor(inputs["pixel_values"]),
            "image_grid_thw": torch.tensor(inputs["image_grid_thw"]).squeeze(0),
            "mm_token_type_ids": torch.tensor(token_types)}


def recipe_loader(cfg, processor, count):
    """datasets.map over the first `count` samples, then the recipe's DataCollatorForSeq2Seq."""
    import datasets
    from torch.utils.data import DataLoader

    raw = datasets.Dataset.from_json(os.path.join(cfg.work_dir, "data_vl.json"),
                                     cache_dir=os.path.join(cfg.work_dir, "hf_cache")).select(range(count))
    mapped = raw.map(lambda example: recipe_process_func(example, processor, cfg.image_size),
                     remove_columns=raw.column_names, cache_file_name=os.path.join(cfg.work_dir, "recipe_map.arrow"))
    # no set_format("torch"): the recipe hands Trainer the mapped lists, which its collator turns into tensors
    return DataLoader(mapped, batch_size=BATCH, collate_fn=recipe_collator(processor), shuffle=True)


def recipe_collator(processor):
    """The recipe's DataCollatorForSeq2Seq, plus padding for mm_token_type_ids (which transformers 5 needs)."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    seq2seq = DataCollatorForSeq2Seq(tokenizer=processor.tokenizer, padding=True)

    def collate(features):
        features = [dict(feature) for feature in features]
        token_types = [feature.pop("mm_token_type_ids") for feature in features]
        batch = seq2seq(features)
        batch["mm_token_type_ids"] = torch.zeros_like(batch["input_ids"])
        for row, types in enumerate(token_types):
            batch["mm_token_type_ids"][row, : len(types)] = torch.as_tensor(types)
        return batch

    return collate


# ----------------------------------------------------------------------------- this project's path

def family(cfg):
    return FAMILIES[SIZES[cfg.model_size]["family"]]


def geometry(cfg):
    """The images' geometry in train.py: the bench's images are squares, which it keeps as they are."""
    from captioning.images import ImageGeometry

    return ImageGeometry(cfg.image_size, family(cfg).side_multiple)


def project_dataset(cfg, processor, count):
    from captioning.data import read_conversations
    from captioning.training_samples import CaptionDataset

    samples = read_conversations(os.path.join(cfg.work_dir, "data_vl.json"))[:count]
    return CaptionDataset(samples, processor, geometry(cfg), max_length=8192)


def project_loader(dataset, collator, batch_size, sampler=None, workers=2):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, collate_fn=collator, sampler=sampler, shuffle=sampler is None,
                      num_workers=workers, persistent_workers=workers > 0)


# ----------------------------------------------------------------------------- measurements (child processes)

def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure_data(cfg, path_name):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(os.path.join(cfg.work_dir, "model"))
    baseline = current_rss_mb()
    start = time.perf_counter()
    if path_name == "recipe":
        loader = recipe_loader(cfg, processor, cfg.images)
    else:
        from captioning.training_samples import CaptionCollator

        dataset = project_dataset(cfg, processor, cfg.images)
        # no worker processes here, so that the peak RSS of this process holds all the preparation's memory
        loader = project_loader(dataset, CaptionCollator(processor.tokenizer.pad_token_id, family(cfg)), BATCH, workers=0)
    batch = next(iter(loader))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "added_rss_mb": peak_rss_mb() - baseline,
            "first_batch_pixel_rows": int(batch["pixel_values"].reshape(-1, batch["pixel_values"].shape[-1]).shape[0])}


def model_and_device(cfg):
    import torch

    from captioning.models import load_model_and_processor
    from captioning.precision import compute_choice

    compute = compute_choice()
    model, processor = load_model_and_processor(os.path.join(cfg.work_dir, "model"), compute, on_device=True)
    torch.manual_seed(0)  # the same LoRA initialisation for both paths
    return model, processor, compute


def measure_training(cfg, path_name):
    import tempfile

    import torch
    from accelerate.utils import send_to_device
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode

    from captioning import feature_cache, step_plan
    from captioning.trainer import LengthGroupedSampler
    from captioning.training_samples import CaptionCollator

    model, processor, compute = model_and_device(cfg)
    device = compute.device
    model = get_peft_model(model, LoraConfig(target_modules=family(cfg).lora_target_modules, r=64, lora_alpha=16,
                                             lora_dropout=0.05))
    encode_seconds = 0.0
    if path_name == "recipe":  # gradient checkpointing always on, 4 x 4 accumulation, the preprocessed dataset
        step_plan.set_gradient_checkpointing(model, True)
        micro_batch, sampler = BATCH, None
        loader = recipe_loader(cfg, processor, cfg.images)
    else:  # what train.py does: image features once, micro-batches and checkpointing by a memory probe, grouping
        dataset = project_dataset(cfg, processor, cfg.images)
        start = time.perf_counter()
        dataset.image_features = feature_cache.encode_images(model, processor, dataset, BATCH * ACCUMULATION,
                                                     tempfile.gettempdir())
        encode_seconds = time.perf_counter() - start
        collator = CaptionCollator(processor.tokenizer.pad_token_id, family(cfg))
        plan = SimpleNamespace(per_device_train_batch_size=BATCH, gradient_accumulation_steps=ACCUMULATION,
                               micro_batch_size="auto", gradient_checkpointing="auto")
        micro_batch, _, _ = step_plan.plan_steps(plan, model, dataset, collator, 1, compute)
        sampler = LengthGroupedSampler(dataset.lengths, BATCH * ACCUMULATION, seed=0)
        loader = project_loader(dataset, collator, micro_batch, sampler)
    if device == "cuda":  # after the encoding and the probe, whose tries are not training's memory
        torch.cuda.reset_peak_memory_stats()
    model.train()
    accumulation = BATCH * ACCUMULATION // micro_batch
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step = samples = tokens = 0
    counter = FlopCounterMode(display=False)  # counts the first step's FLOPs (a warm-up step, not timed)
    for epoch in range(cfg.epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(len(loader) // accumulation):
            if step == cfg.warmup_steps:
                if device == "cuda":
                    torch.cuda.synchronize()
                start, samples, tokens = time.perf_counter(), 0, 0
            with counter if step == 0 else contextlib.nullcontext():
                for _ in range(accumulation):
                    batch = send_to_device(next(batches), device)
                    with torch.autocast(device, dtype=compute.dtype, enabled=compute.precision != "fp32"):
                        loss = model(**batch).loss / accumulation
                    loss.backward()
                    samples += batch["input_ids"].shape[0]
                    tokens += int(batch["attention_mask"].sum())
            if step == 0:
                flops_per_token = counter.get_total_flops() / tokens
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
    if device == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - start
    seconds = train_seconds + encode_seconds
    result = {"samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds, "seconds": seconds,
              "encode_seconds": encode_seconds, "steps": step, "micro_batch": micro_batch,
              "accumulation": accumulation, "checkpointing": model.get_base_model().is_activation_checkpointing,
              "precision": str(compute), "flops_per_token": flops_per_token, "peak_rss_mb": peak_rss_mb()}
    if device == "cuda":
        peak_flops = float(os.environ.get("BENCH_PEAK_TFLOPS", "989")) * 1e12  # H100/H200 dense bf16
        result.update(peak_gpu_allocated_mb=torch.cuda.max_memory_allocated() / 2**20,
                      peak_gpu_reserved_mb=torch.cuda.max_memory_reserved() / 2**20,
                      # the FLOPs counted on the first step, per token, over the timed steps (encoding left out)
                      mfu=flops_per_token * tokens / train_seconds / peak_flops)
    return result


def captions_a_person_can_compare(model, tokenizer):
    """Give the random model an output layer of its own that writes only printable text, so that the check that
    batched and single captions agree can fail. With the embeddings tied, a random model repeats its input token,
    the same one for every image; and most of its ids (past the benchmark's ~400-token tokenizer, special tokens,
    lone bytes shown as U+FFFD) decode to nothing or to the same character. A fresh random layer (the same shape,
    so the same cost) with those rows zeroed, logit 0 losing to the largest of the hundreds left, gives every image
    its own caption of max_new_tokens tokens."""
    import torch

    head = model.get_output_embeddings()
    weight = torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.02
    weight[len(tokenizer):] = 0
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id], skip_special_tokens=True)
        if not text or not text.isprintable() or "\ufffd" in text:
            weight[token_id] = 0
    head.weight = torch.nn.Parameter(weight.to(head.weight), requires_grad=False)


def measure_captioning(cfg, path_name):
    from captioning.generation import generate_captions
    from captioning.images import load_image

    model, processor, *_ = model_and_device(cfg)  # the model is already on its device
    captions_a_person_can_compare(model, processor.tokenizer)
    model.eval()
    paths = [os.path.join(cfg.work_dir, "images", f"{number}.jpg") for number in range(cfg.caption_images)]
    loaded = [load_image(path, geometry(cfg)) for path in paths]
    batch_size = 1 if path_name == "one_at_a_time" else len(loaded)

    def timed(max_new_tokens):
        start = time.perf_counter()
        captions = generate_captions(model, processor, loaded, "COCO Yes:", max_new_tokens, batch_size=batch_size)
        return time.perf_counter() - start, captions

    generate_captions(model, processor, loaded[:2], "COCO Yes:", 4, batch_size=2)  # warm-up
    seconds, captions = timed(cfg.max_new_tokens)
    # the images and prompts alone (one new token): what batching cannot save where that pass is compute-bound
    first_token_seconds, _ = timed(1)
    return {"images_per_s": len(loaded) / seconds, "seconds": seconds, "first_token_seconds": first_token_seconds,
            "captions": captions}


def measure_reinforcement(cfg, _):
    """One train_rl.py step (BATCH images x RL_CAPTIONS captions sampled at temperature 1, rewarded, scored, one
    update) against one train.py step on the same images (one sample each, the vision tower run in the step as in
    train_rl.py's): seconds of each over 3 steps after a warm-up one. The random model's captions never end, so
    every caption runs its max_new_tokens: the longest such a step takes."""
    import torch
    from accelerate.utils import send_to_device
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments

    from captioning.caption_reward import CiderReward
    from captioning.self_critical import PromptCollator, SelfCriticalTrainer
    from captioning.training_samples import CaptionCollator

    model, processor, compute = model_and_device(cfg)
    captions_a_person_can_compare(model, processor.tokenizer)
    model = get_peft_model(model, LoraConfig(target_modules=family(cfg).lora_target_modules, r=64, lora_alpha=16,
                                             lora_dropout=0.05))
    dataset = project_dataset(cfg, processor, BATCH)
    paths = [sample["image_path"] for sample in dataset.samples]
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(output_dir=folder, use_cpu=compute.device == "cpu", report_to="none")
        trainer = SelfCriticalTrainer(
            model=model, args=args, processing_class=processor, num_generations=RL_CAPTIONS, temperature=1.0,
            reward=CiderReward({path: CAPTIONS for path in paths}, use_java=False), max_new_tokens=cfg.max_new_tokens,
            scale_rewards=False, beta=0.0, family=family(cfg))
    prompts = PromptCollator(processor, geometry(cfg), "COCO Yes:")([{"image_path": path} for path in paths])
    samples = CaptionCollator(processor.tokenizer.pad_token_id, family(cfg))([dataset[n] for n in range(BATCH)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def seconds_per_step(loss_of_a_step):
        for step in range(4):  # a warm-up step, then 3 timed
            if step == 1:
                if compute.device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            with torch.autocast(compute.device, dtype=compute.dtype, enabled=compute.precision != "fp32"):
                loss = loss_of_a_step()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if compute.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / 3

    def training_step():
        model.train()
        return model(**send_to_device(samples, compute.device)).loss

    train_seconds = seconds_per_step(training_step)
    rl_seconds = seconds_per_step(lambda: trainer.compute_loss(model, send_to_device(dict(prompts), compute.device)))
    return {"train_step_seconds": train_seconds, "rl_step_seconds": rl_seconds, "images": BATCH,
            "captions_per_image": RL_CAPTIONS, "captions_per_s": BATCH * RL_CAPTIONS / rl_seconds}


def measure_training_set(cfg, _):
    """Building train.py's training set from data_vl.json, every caption tokenised: time and peak RSS. The processor
    is the small model's (its tokenizer is the tests' small one), built here first."""
    from transformers import AutoProcessor

    from testkit.tiny_models import BUILDERS

    cfg.model_size = "small"
    size = SIZES[cfg.model_size]
    BUILDERS[size["family"]](os.path.join(cfg.work_dir, "model"), text=size["text"], vision=size["vision"],
                             vocab_size=size["vocab_size"])
    processor = AutoProcessor.from_pretrained(os.path.join(cfg.work_dir, "model"))
    start = time.perf_counter()
    dataset = project_dataset(cfg, processor, None)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "samples": len(dataset)}


PARTS = {
    "data/recipe": measure_data, "data/project": measure_data, "scale/training_set": measure_training_set,
    "train/recipe": measure_training, "train/project": measure_training,
    "caption/one_at_a_time": measure_captioning, "caption/batched": measure_captioning,
    "reinforcement/step": measure_reinforcement,
}


# ----------------------------------------------------------------------------- main

def run_part(name, cfg, work_dir=None):
    result = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--part={name}", f"--work_dir={work_dir or cfg.work_dir}",
         *(f"--{key}={getattr(cfg, key)}" for key in ("images", "image_size", "epochs", "warmup_steps",
                                                     "caption_images", "max_new_tokens", "model_size"))],
        capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"benchmark part {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(results):
    def ratio(ours, theirs):
        return f"{ours / theirs:.1f}x"

    data, training, caption = results["data"], results["train"], results["caption"]
    rows = [
        ("data prep: wall time (s)", data["recipe"]["seconds"], data["project"]["seconds"],
         ratio(data["recipe"]["seconds"], data["project"]["seconds"]) + " less"),
        ("data prep: peak RSS (MB)", data["recipe"]["peak_rss_mb"], data["project"]["peak_rss_mb"],
         ratio(data["recipe"]["peak_rss_mb"], data["project"]["peak_rss_mb"]) + " less"),
        ("data prep: RSS added after imports (MB)", data["recipe"]["added_rss_mb"], data["project"]["added_rss_mb"],
         ratio(data["recipe"]["added_rss_mb"], data["project"]["added_rss_mb"]) + " less"),
        ("training: samples/s", training["recipe"]["samples_per_s"], training["project"]["samples_per_s"],
         ratio(training["project"]["samples_per_s"], training["recipe"]["samples_per_s"])),
        ("training: tokens/s", training["recipe"]["tokens_per_s"], training["project"]["tokens_per_s"],
         ratio(training["project"]["tokens_per_s"], training["recipe"]["tokens_per_s"])),
        ("training: peak RSS (MB)", training["recipe"]["peak_rss_mb"], training["project"]["peak_rss_mb"], ""),
        ("training: encoding images once, included (s)", 0.0, training["project"]["encode_seconds"], ""),
    ]
    rows.append(("training: GFLOP per token (counted)", training["recipe"]["flops_per_token"] / 1e9,
                 training["project"]["flops_per_token"] / 1e9,
                 ratio(training["recipe"]["flops_per_token"], training["project"]["flops_per_token"]) + " less"))
    if "mfu" in training["project"]:
        rows += [(f"training: peak GPU memory {kind} (MB)", training["recipe"][f"peak_gpu_{kind}_mb"],
                  training["project"][f"peak_gpu_{kind}_mb"], "") for kind in ("allocated", "reserved")]
        rows.append(("training: MFU (counted FLOPs)", training["recipe"]["mfu"], training["project"]["mfu"], ""))
    rows.append(("captioning: images/s (one at a time / batched)", caption["one_at_a_time"]["images_per_s"],
                 caption["batched"]["images_per_s"],
                 ratio(caption["batched"]["images_per_s"], caption["one_at_a_time"]["images_per_s"])))
    rows.append(("captioning: images and prompts only (s)", caption["one_at_a_time"]["first_token_seconds"],
                 caption["batched"]["first_token_seconds"],
                 ratio(caption["one_at_a_time"]["first_token_seconds"], caption["batched"]["first_token_seconds"])
                 + " less"))
    lines = [f"| {'measure':<48} | {'recipe':>10} | {'this project':>12} | {'ratio':>10} |",
             f"|{'-' * 50}|{'-' * 12}:|{'-' * 14}:|{'-' * 12}:|"]
    lines += [f"| {name:<48} | {theirs:>10.2f} | {ours:>12.2f} | {note:>10} |" for name, theirs, ours, note in rows]
    same = caption["one_at_a_time"]["captions"] == caption["batched"]["captions"]
    lines.append(f"\ncaptions identical batched and one at a time: {'yes' if same else 'NO'}")
    step = results["reinforcement"]["step"]
    lines += ["", f"| {'a step on the same ' + str(step['images']) + ' images':<48} | {'train.py':>10} | "
                  f"{'train_rl.py':>12} | {'ratio':>10} |", f"|{'-' * 50}|{'-' * 12}:|{'-' * 14}:|{'-' * 12}:|",
              f"| {'seconds (train_rl.py: ' + str(step['captions_per_image']) + ' captions per image)':<48} | "
              f"{step['train_step_seconds']:>10.2f} | {step['rl_step_seconds']:>12.2f} | "
              f"{ratio(step['rl_step_seconds'], step['train_step_seconds']) + ' longer':>10} |",
              f"| {'train_rl.py: captions sampled and scored per s':<48} | {'':>10} | "
              f"{step['captions_per_s']:>12.2f} | {'':>10} |"]
    return "\n".join(lines)


def measure_data_at_scale(cfg):
    """The data part (bench/data_scale.py): fetching, and the data steps at each of data_rows. This process imports
    no torch: a process it starts would count this one's memory at the start into its own peak (Linux's maxrss)."""
    import data_scale  # beside this script

    try:
        cfg.data_row_counts = sorted(int(float(rows)) for rows in cfg.data_rows.split(","))
    except ValueError as error:
        raise PipelineError(f"--data_rows={cfg.data_rows}: give row counts, e.g. 1000,10000,100000") from error
    print(f"measuring fetching: {cfg.fetch_images} images, {cfg.fetch_latency} s per answer", flush=True)
    results = data_scale.measure(cfg, lambda name, work_dir: run_part(name, cfg, work_dir))
    results["settings"] = {key: getattr(cfg, key) for key in ("data_rows", "fetch_images", "fetch_workers",
                                                              "fetch_latency", "image_size")}
    write_json(cfg.data_output, results)
    print(data_scale.table(results))
    print(f"wrote {cfg.data_output}")


def main(argv=()):
    cfg = parse_settings(globals(), argv)
    if cfg.part:
        print(json.dumps(PARTS[cfg.part](cfg, cfg.part.split("/")[1])))
        return
    if cfg.data_rows:
        cfg.image_size = checked_image_size(cfg.image_size, FAMILIES[SIZES["small"]["family"]])
        return measure_data_at_scale(cfg)
    import torch
    import transformers

    if cfg.model_size == "auto":
        cfg.model_size = "2b" if torch.cuda.is_available() else "small"
    if cfg.model_size not in SIZES:
        raise PipelineError(f"--model_size={cfg.model_size}: use auto, {', '.join(SIZES)}")
    cfg.image_size = checked_image_size(cfg.image_size, FAMILIES[SIZES[cfg.model_size]["family"]])
    if cfg.images // (BATCH * ACCUMULATION) * cfg.epochs <= cfg.warmup_steps:
        raise PipelineError(f"--images={cfg.images} --epochs={cfg.epochs}: that is not more steps of "
                            f"{BATCH * ACCUMULATION} samples than the {cfg.warmup_steps} warm-up steps")
    with tempfile.TemporaryDirectory() as folder:
        cfg.work_dir = folder
        print(f"preparing {cfg.images} images at {cfg.image_size}x{cfg.image_size} and a {cfg.model_size} model")
        prepare(cfg, folder)
        results = {"date": time.strftime("%Y-%m-%d"),
                   "machine": {"python": platform.python_version(), "torch": torch.__version__,
                               "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
                               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
                   "settings": {key: getattr(cfg, key) for key in ("images", "image_size", "epochs",
                                                                   "warmup_steps", "caption_images", "max_new_tokens",
                                                                   "model_size")}}
        for name in (name for name in PARTS if not name.startswith("scale/")):  # scale/ parts: --data_rows only
            print(f"measuring {name} ...", flush=True)
            group, path_name = name.split("/")
            results.setdefault(group, {})[path_name] = run_part(name, cfg)
            write_json(cfg.output, results)  # after each part, so that an interrupted run keeps what it measured
    print(table(results))
    print(f"wrote {cfg.output}")


if __name__ == "__main__":
    run_script(main)
