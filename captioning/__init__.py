"""What the scripts share, one job a file named after it:

settings            a script's settings block as its command line, and the settings every script shares
scripts             run_script: one-paragraph failures, exit codes, SIGTERM as an interruption
errors              PipelineError, the one exception that reaches the user as a message
files               writes that leave no half-written file, files readable by all
disk_full           a full disk turned into one message that says what to free
locks               one process at a time per output folder or file
processes           which process this is, launcher mistakes, joining them, decisions taken by the main one
data                the recipe's conversation JSON read as samples
images              images as the model sees them: upright RGB, resized as the serving engines resize them
image_paths         infer.py's --images: folders, globs, lists, CSV and JSON, read a path at a time
chat                the messages for an image, the token that ends a turn, the label the loss skips
models              the Qwen-VL families, one record each, and loading a model with its processor
precision           precision and attention chosen per GPU
quantization        the 4- and 8-bit base model (QLoRA) and the bytes its weights take
deepspeed_configs   the deepspeed setting: ZeRO config files and their stage
training_samples    train.py's samples made on the fly, and the collator that batches them
step_plan           each optimizer step's micro-batches and checkpointing, from the memory probe
feature_cache       the frozen vision tower's features computed once per image, one memory-mapped file per node
trainer             Trainer with the length-grouped sampler and its callbacks
checkpoints         checkpoints and adapters on disk: complete ones, resuming, the final adapter, run_config.json
served_files        the processor and config files outside tools read, with training's image size pinned
generation          captions from a model: greedy, in batches
vllm_engine         captions from vLLM: the merged folder, or base + adapter
predictions         infer.py's predictions.jsonl, written as captioning goes
metrics             the COCO caption metrics, as pycocoevalcap computes them
caption_reward      the reinforcement stage's reward: CIDEr-D over the training references, fixed once
self_critical       train_rl.py's loop: captions sampled per image, rewarded, judged against their group's mean
pages               the HTML pieces of compare.py's report and demo.py's page
tracking            SwanLab: its mode and run
"""
