"""What the scripts share, one job a file named after it: settings, scripts, errors, files, disk_full, locks, data,
images, chat, models, precision, generation, adapters, model_files, pages, tracking; speed and training_run for
train.py."""
