"""What train.py and eval.py share."""

from absl import flags, logging


def warnings_only_unless_verbosity_given() -> None:
    """absl logging at WARNING unless ``--verbosity`` was passed: orbax logs several INFO lines
    per checkpoint save or restore, which would bury the progress bars (``--verbosity=0`` shows
    them)."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
