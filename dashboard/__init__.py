"""Browse studies: optuna-dashboard on the study storage, per-trial artifacts, plotly reports.

Imports fpstune's storage read side, optuna and plotly; never Ray or the worker side.
"""

from __future__ import annotations
