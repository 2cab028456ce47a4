"""State-tracking and recall tasks on the reference LM: the papers' claims as a runnable suite.

Tasks (:mod:`householder.tasks.generators`, NumPy only, generated on the fly
from a seed): parity, mod_arith (sum mod 3; ``mod_arith<p>`` for any p), the
permutation-group word problems s3, s4, a5, s5, and multi-query associative
recall (mqar). Models (:mod:`householder.tasks.models`): DeltaNet and
DeltaProduct with beta in [0, 1] or [0, 2], their gated variants, a
Transformer and a diagonal-decay linear attention. ``python -m householder
tasks`` trains the grid with :func:`householder.training.train_loop`, scores
every cell at the training length and 2x-4x longer, and writes a table
(markdown, CSV) and a heatmap PNG. Importing this package does not import torch.
"""

from householder.tasks.cli import PRESETS, add_subcommand, run
from householder.tasks.generators import IGNORE, MQAR, CyclicSum, GroupWordProblem, Task, get_task, permutation_group, score, task_names
from householder.tasks.models import DEFAULT_MODELS, label, mixer_settings
from householder.tasks.trainer import CellSettings

__all__ = [
    "CellSettings",
    "CyclicSum",
    "DEFAULT_MODELS",
    "GroupWordProblem",
    "IGNORE",
    "MQAR",
    "PRESETS",
    "Task",
    "add_subcommand",
    "get_task",
    "label",
    "mixer_settings",
    "permutation_group",
    "run",
    "score",
    "task_names",
]
