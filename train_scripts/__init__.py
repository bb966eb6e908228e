"""The training scripts, installed as `medaug.scripts`: each runs as `accelerate launch train_scripts/NAME.py ...`
from a checkout, or as `accelerate launch -m medaug.scripts.NAME ...` (or `python -m`) wherever medaug is
installed. Each imports only medaug and libraries, never another script."""
