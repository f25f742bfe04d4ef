"""How a script meets its user: run_script's one-paragraph failures and exit codes, SIGTERM as an interruption."""

import signal
import sys

from captioning.disk_full import is_disk_full
from captioning.errors import PipelineError
from captioning.settings import parse_settings


def run_script(main):
    """Run a script's main(argv) the way a user meets it: a one-paragraph message and a non-zero exit on failure,
    the traceback only with --debug=true."""
    argv = sys.argv[1:]
    signal.signal(signal.SIGTERM, stop_on_sigterm)  # schedulers and torchrun stop jobs with SIGTERM
    try:
        main(argv)
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted: the files already finished are kept, and none is left half-written", file=sys.stderr)
        sys.exit(130)
    except Exception as error:
        close_progress_bars()
        if debug_requested(main, argv):
            raise
        if isinstance(error, PipelineError):
            print(f"error: {error}", file=sys.stderr)
        elif is_disk_full(error):  # a small write with no message of its own (the big ones use stop_if_disk_full)
            print(f"error: the disk is full: {error}. Free some space on it and run the same command again",
                  file=sys.stderr)
        else:
            print(f"error: unexpected {type(error).__name__}: {error}\n(run again with --debug=true to see where "
                  "it happened, and report it with that traceback)", file=sys.stderr)
        sys.exit(1)


def close_progress_bars():
    """Close the bars a failure left open (tqdm's own list of them): else they are redrawn at exit, below the error."""
    if "tqdm" in sys.modules:
        for bar in list(sys.modules["tqdm"].tqdm._instances):
            bar.close()


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def debug_requested(main, argv):
    try:  # settings the block does not name are let through here: only debug matters
        return parse_settings(main.__globals__, argv, more_settings=lambda *unchecked: {}).debug
    except PipelineError:
        return False
