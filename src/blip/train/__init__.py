"""Training: objectives (ITC/ITM/LM), the loop, schedules, and the `blip pretrain` command."""
from .config import TrainConfig
from .loop import Trainer
from .objectives import MomentumTowers, PretrainObjective, StepInfo, tie_text_towers

__all__ = ["MomentumTowers", "PretrainObjective", "StepInfo", "TrainConfig", "Trainer", "tie_text_towers"]
