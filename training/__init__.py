"""The training runtime that pretrain.py and evaluate.py share: the typed config (`config`), a run's pieces built
from it (`build`), the train state and its save / resume (`train_state`), one optimisation step (`train_step`),
evaluation (`evaluation`, `tta`), the run folder's owner and lock (`run_folder`), early stopping and keep-best
(`training_options`) and the parameter EMA (`ema`). Infrastructure used by every layer lives in `utils/`."""
