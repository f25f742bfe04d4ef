"""SwanLab: the mode a run logs in (cloud, local, offline, disabled) and starting or continuing its run."""

import os

from captioning.errors import PipelineError

SWANLAB_MODES = {"cloud": "online", "online": "online", "local": "local", "offline": "offline", "disabled": "disabled"}


def swanlab_run_mode(requested):
    """SwanLab's own mode name for the swanlab_mode setting; auto is $SWANLAB_MODE when set, else cloud when logged
    in, else local."""
    rename_swanlab_project_variable()
    if requested == "auto" and os.environ.get("SWANLAB_MODE"):
        requested = os.environ["SWANLAB_MODE"]
        if requested not in SWANLAB_MODES:
            raise PipelineError(f"SWANLAB_MODE={requested}: use cloud, local, offline or disabled")
    if requested == "auto":
        return "online" if swanlab_logged_in() else "local"
    if requested not in SWANLAB_MODES:
        raise PipelineError(f"--swanlab_mode={requested}: use auto, cloud, local, offline or disabled")
    return SWANLAB_MODES[requested]


def rename_swanlab_project_variable():
    """swanlab 0.10 reads $SWANLAB_PROJECT as a JSON object and stops on a plain name: it becomes $SWANLAB_PROJ_NAME,
    swanlab's own name for the project."""
    if "SWANLAB_PROJECT" in os.environ:
        os.environ.setdefault("SWANLAB_PROJ_NAME", os.environ.pop("SWANLAB_PROJECT"))


def swanlab_logged_in():
    import swanlab

    try:
        return swanlab.Settings().api_key is not None  # SWANLAB_API_KEY, or the key `swanlab login` saved
    except Exception:  # an unreadable setting in the environment: swanlab.init will name it
        return False


def start_swanlab(mode, project, default_project, name, config, run_id=None):
    """A SwanLab run; with run_id it continues that run's experiment. $SWANLAB_PROJ_NAME (or $SWANLAB_PROJECT)
    replaces the project when the setting is left at default_project; swanlab itself reads $SWANLAB_WORKSPACE and
    $SWANLAB_LOG_DIR."""
    import swanlab

    rename_swanlab_project_variable()
    if project == default_project:
        project = os.environ.get("SWANLAB_PROJ_NAME") or project
    return swanlab.init(project=project, name=name, config=config, mode=mode, id=run_id,
                        resume="allow" if run_id else None)
