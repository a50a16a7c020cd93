"""Training: objectives (ITC/ITM/LM), the loop, schedules, and the `blip pretrain` command."""
from .config import TrainConfig
from .loop import FolderBusy, Trainer
from .objectives import MomentumTowers, PretrainObjective, StepInfo, tie_text_towers

__all__ = ["FolderBusy", "MomentumTowers", "PretrainObjective", "StepInfo", "TrainConfig", "Trainer", "tie_text_towers"]
