"""Step 3b (optional): train train.py's adapter further on what compare.py measures, CIDEr-D, by self-critical
sampling with a group baseline.

    python train_rl.py                                 # after train.py: output/Qwen2-VL-2B -> output/Qwen2-VL-2B-rl
    python train_rl.py --sft_dir output/mine --num_generations 8 --max_steps 500
    python compare.py --output_dir output/Qwen2-VL-2B-rl   # base, train.py's adapter and this one side by side

For each training image it samples num_generations captions, rewards each with its CIDEr-D against all references
of that image in the training data, and pushes up the captions above their group's mean reward, down the others.
It writes the same LoRA, trained further, into output_dir as train.py writes its own: infer.py, compare.py, demo.py,
merge.py, export_gguf.py and verify.py take it as they take train.py's.
"""
import os
from contextlib import nullcontext

from captioning.caption_reward import CiderReward
from captioning.checkpoints import ADAPTER_CONFIG, RUN_CONFIG, read_run_config, resume_point, save_final_adapter, \
    train_until_done
from captioning.data import references_by_image, report_skipped
from captioning.deepspeed_configs import is_zero3, resolve_deepspeed
from captioning.errors import PipelineError
from captioning.files import write_json
from captioning.images import trained_geometry, upright_size
from captioning.locks import hold
from captioning.metrics import cider_d, java_available
from captioning.models import family_named
from captioning.precision import compute_choice
from captioning.processes import check_shared_output_dir, decided_by_the_main_process, prepare_launch, print_once, \
    this_process
from captioning.quantization import check_quantization, eval_mode_between_training_steps
from captioning.scripts import run_script
from captioning.settings import parse_settings, require_positive
from captioning.tracking import start_swanlab, swanlab_run_mode

# torch, transformers and the modules built on them are imported where they are used, so that --help answers at once

# ----------------------------------------------------------------------------- settings
sft_dir = "output/Qwen2-VL-2B"  # train.py's output_dir: its final adapter, training data, prompt, image size and model
output_dir = ""  # empty: sft_dir with -rl after it (output/Qwen2-VL-2B-rl)
reward = "cider"  # cider: CIDEr-D against all references of the image in the training data, as compare.py scores
num_generations = 8  # captions sampled per image; each is judged against the mean reward of its image's captions
temperature = 1.0  # of the sampling, as published self-critical training samples; tiny test models need a low one
scale_rewards = False  # also divide each caption's advantage by the spread of its image's rewards (GRPO's scaling)
beta = 0.0  # weight of a KL penalty that keeps the adapter near train.py's; 0: none (nothing extra is loaded)
num_train_epochs = 1.0
max_steps = -1  # > 0 overrides num_train_epochs
per_device_train_batch_size = 4  # images per step on each GPU, each with num_generations captions
gradient_accumulation_steps = 1
learning_rate = 1e-5
max_new_tokens = 64  # a sampled caption that has not ended within them is a fragment: rewarded 0
eval_steps = 50  # greedy CIDEr-D of the held-out images every eval_steps steps, and before the first
logging_steps = 10
save_steps = 100
java = "auto"  # auto: Java's PTB tokenizer for the reward, as compare.py | never: its Python stand-in
precision = "auto"  # the same in every script: --help
attention = "auto"  # the same in every script: --help
deepspeed = ""  # the same in every script: --help
resume = "auto"  # the same in every script: --help
swanlab_mode = "auto"  # the same in every script: --help
swanlab_project = "Qwen2-VL-finetune"  # the same in every script: --help
swanlab_run_name = ""  # the same in every script: --help
seed = 42
debug = False  # show the full traceback of a failure
# -----------------------------------------------------------------------------

REWARDS = ("cider",)


# ----------------------------------------------------------------------------- settings checked before anything loads

def check_settings(cfg):
    """Refuse what train_rl.py cannot use before anything loads; returns train.py's run_config.json, its training
    references {image: [captions]}, the DeepSpeed config (or None) and the compute (precision and attention)."""
    require_positive(cfg, "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "max_new_tokens", "eval_steps", "logging_steps", "save_steps")
    if cfg.num_generations < 2:
        raise PipelineError(f"--num_generations={cfg.num_generations}: each image needs at least 2 sampled captions, "
                            "since each is judged against the mean reward of the others (8 is usual)")
    if cfg.temperature <= 0:
        raise PipelineError(f"--temperature={cfg.temperature}: the captions must be sampled, at a temperature above 0 "
                            "(greedy captions would all be the same and teach nothing)")
    if cfg.beta < 0:
        raise PipelineError(f"--beta={cfg.beta}: use 0 (no KL penalty) or a positive weight")
    if cfg.reward not in REWARDS:
        raise PipelineError(f"--reward={cfg.reward}: use {' or '.join(REWARDS)}")
    for name, choices in (("resume", ("auto", "never")), ("java", ("auto", "never"))):
        if getattr(cfg, name) not in choices:
            raise PipelineError(f"--{name}={getattr(cfg, name)}: use {' or '.join(choices)}")
    deepspeed_config = resolve_deepspeed(cfg.deepspeed)
    if not os.path.isfile(os.path.join(cfg.sft_dir, ADAPTER_CONFIG)):
        raise PipelineError(f"{cfg.sft_dir} holds no finished train.py run (no {ADAPTER_CONFIG}): run train.py first, "
                            "or point --sft_dir at its output_dir")
    sft_run = read_run_config(cfg.sft_dir)
    if "started_from" in sft_run:
        raise PipelineError(f"{cfg.sft_dir} is a train_rl.py run: point --sft_dir at train.py's output_dir")
    cfg.output_dir = cfg.output_dir or os.path.normpath(cfg.sft_dir) + "-rl"
    if os.path.abspath(cfg.output_dir) == os.path.abspath(cfg.sft_dir):
        raise PipelineError("--output_dir is --sft_dir: the run would replace the adapter it starts from")
    references = references_by_image(sft_run["train_json"])
    if not references:
        raise PipelineError(f"{sft_run['train_json']} has no training captions to reward against: run train.py on "
                            "data with captions")
    check_quantization(sft_run.get("quantization", "none"), deepspeed_config)
    return sft_run, references, deepspeed_config, compute_choice(cfg.precision, cfg.attention)


# ----------------------------------------------------------------------------- the run, phase by phase

def readable_images(references):
    """The images whose files open, the others named and skipped."""
    readable, skipped = [], []
    for path in references:
        try:
            upright_size(path)
            readable.append(path)
        except PipelineError as error:
            skipped.append(str(error))
    report_skipped(skipped, "training images")
    if not readable:
        raise PipelineError("none of the training images could be read")
    return readable


def policy_and_processor(cfg, sft_run, compute):
    """The base model train.py used with its adapter, trainable, on top; beside it, when beta > 0, the same adapter
    frozen as "reference" for the KL penalty."""
    from peft import PeftModel

    from captioning.models import load_model_and_processor

    base_model, processor = load_model_and_processor(sft_run["model"], compute,
                                                     quantization=sft_run.get("quantization", "none"))
    policy = PeftModel.from_pretrained(base_model, cfg.sft_dir, is_trainable=True)
    if cfg.beta:
        policy.load_adapter(cfg.sft_dir, adapter_name="reference", is_trainable=False)
    policy.print_trainable_parameters()
    return policy, processor


def held_out_scorer(cfg, processor, geometry, prompt, references, use_java):
    """model -> greedy captions of the held-out images, with their CIDEr-D and mean length as Trainer logs."""
    from captioning.generation import caption_files

    def score(model):
        eval_mode_between_training_steps(model)
        captions = dict(caption_files(model, processor, references, geometry, prompt, cfg.max_new_tokens,
                                      batch_size=cfg.per_device_train_batch_size, show_progress=False))
        score.captions = captions
        return {"eval_cider_d": cider_d({path: references[path] for path in captions}, captions, use_java),
                "eval_caption_words": sum(len(caption.split()) for caption in captions.values()) / len(captions)}
    return score


def trainer_arguments(cfg, deepspeed_config, compute, evaluate):
    """TrainingArguments from the settings. Creating them also joins this process to the others under torchrun."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=cfg.output_dir, per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps, learning_rate=cfg.learning_rate, logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps, eval_strategy="steps" if evaluate else "no", eval_steps=cfg.eval_steps,
        seed=cfg.seed, logging_first_step=True, bf16=compute.precision == "bf16", fp16=compute.precision == "fp16",
        use_cpu=compute.device == "cpu", report_to="none", remove_unused_columns=False, deepspeed=deepspeed_config,
        ddp_find_unused_parameters=False, dataloader_num_workers=0)


def print_plan(cfg, images, references, held_out, args):
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * args.world_size
    steps = cfg.max_steps if cfg.max_steps > 0 else -(-int(len(images) * cfg.num_train_epochs) // per_step)
    mean_references = sum(len(references[path]) for path in images) / len(images)
    print_once(f"plan: {len(images)} training images ({mean_references:.1f} references each), {steps} steps of "
               f"{per_step} images x {cfg.num_generations} captions sampled at temperature {cfg.temperature} "
               f"(transformers), reward {cfg.reward} (CIDEr-D against the image's references), KL weight {cfg.beta}; "
               f"greedy CIDEr-D of {len(held_out)} held-out images every {cfg.eval_steps} steps")


def train(cfg, trainer, resume_from):
    """Trainer's loop, a GPU out of memory told in the settings that size a step."""
    import torch

    try:
        train_until_done(trainer, resume_from)
    except torch.cuda.OutOfMemoryError as error:
        raise PipelineError(
            f"the GPU ran out of memory sampling and scoring {cfg.per_device_train_batch_size} images x "
            f"{cfg.num_generations} captions of up to {cfg.max_new_tokens} tokens. Run again with a smaller "
            "--max_new_tokens to continue from the last checkpoint, or start afresh (--resume=never) with a smaller "
            "--per_device_train_batch_size (and a larger --gradient_accumulation_steps for as many images a step) or "
            "--num_generations") from error


def train_rl(cfg, sft_run, references, deepspeed_config, compute, is_main_process):
    """The run, phase by phase: load train.py's adapter, plan, sample and reward, save the adapter, caption the
    held-out images."""
    mode = swanlab_run_mode(cfg.swanlab_mode) if is_main_process else "disabled"
    alone = this_process().count == 1
    if alone:  # decided before the model loads, so that a finished run is refused at once
        resume_from, earlier_run = resume_point(cfg, is_main_process)
    images = readable_images(references)
    held_out = references_by_image(sft_run["test_json"])
    use_java = cfg.java == "auto" and java_available()

    from swanlab.integration.transformers import SwanLabCallback
    from transformers import set_seed

    from captioning.self_critical import PromptCollator, SelfCriticalTrainer
    from captioning.trainer import ReadableCheckpoints

    set_seed(cfg.seed)
    geometry = trained_geometry(sft_run)
    policy, processor = policy_and_processor(cfg, sft_run, compute)
    reward = CiderReward({path: references[path] for path in images}, use_java)
    args = trainer_arguments(cfg, deepspeed_config, compute, evaluate=bool(held_out))  # joins the processes, if several
    check_shared_output_dir(cfg.output_dir, args)
    if not alone:
        resume_from, earlier_run = decided_by_the_main_process(lambda: resume_point(cfg, is_main_process),
                                                                args.process_index, args.world_size)
    print_plan(cfg, images, references, held_out, args)
    score_held_out = held_out_scorer(cfg, processor, geometry, sft_run["prompt"], held_out, use_java)
    trainer = SelfCriticalTrainer(
        model=policy, args=args, train_dataset=[{"image_path": path} for path in images],
        eval_dataset=[{"image_path": path} for path in held_out],
        data_collator=PromptCollator(processor, geometry, sft_run["prompt"]), processing_class=processor,
        callbacks=[SwanLabCallback(), ReadableCheckpoints()], reward=reward, num_generations=cfg.num_generations,
        temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, scale_rewards=cfg.scale_rewards,
        beta=cfg.beta, family=family_named(sft_run["family"]), held_out=score_held_out if held_out else None,
        weights_split=is_zero3(deepspeed_config))

    run_config = {**sft_run, **vars(cfg), "started_from": os.path.abspath(cfg.sft_dir), "swanlab_mode_used": mode,
                  "world_size": args.world_size, "use_java": use_java}
    run = start_swanlab(mode, cfg.swanlab_project, swanlab_project,
                        cfg.swanlab_run_name or os.path.basename(os.path.normpath(cfg.output_dir)), run_config,
                        earlier_run.get("swanlab_run_id"))
    if is_main_process:
        os.makedirs(cfg.output_dir, exist_ok=True)
        write_json(os.path.join(cfg.output_dir, RUN_CONFIG), {**run_config, "swanlab_run_id": run.id})

    train(cfg, trainer, resume_from)
    trainer.save_state()
    if cfg.beta:
        policy.delete_adapter("reference")  # so that output_dir holds the one adapter
    save_final_adapter(trainer, processor, cfg.output_dir, geometry, sft_run["model"])
    print_once(f"saved the adapter, processor and {RUN_CONFIG} to {cfg.output_dir}")
    if held_out and is_main_process:
        import swanlab

        for path, caption in score_held_out.captions.items():  # of Trainer's evaluation after the last step
            print(f"{path}: {caption}")
        swanlab.log({"Prediction": [swanlab.Image(path, caption=caption)
                                    for path, caption in score_held_out.captions.items()]})
        swanlab.finish()


def main(argv=()):
    is_main_process = this_process().is_main  # only it writes files, logs and prints captions
    cfg = parse_settings(globals(), argv)
    prepare_launch()  # before any CUDA query: it may set CUDA_VISIBLE_DEVICES
    sft_run, references, deepspeed_config, compute = check_settings(cfg)
    with hold(cfg.output_dir) if is_main_process else nullcontext():  # one run per output_dir at a time
        train_rl(cfg, sft_run, references, deepspeed_config, compute, is_main_process)


if __name__ == "__main__":
    run_script(main)
