"""AI-feedback scorers and the services that host them.

Importing this package is cheap: scorers register a factory by name and do their heavy imports
(transformers, open_clip) in their constructors.
"""

from reward_servers.base import (
    ScoreBatch,
    Scorer,
    ScoreResult,
    available_scorers,
    build_scorer,
    register_scorer,
)

__all__ = [
    "ScoreBatch",
    "ScoreResult",
    "Scorer",
    "available_scorers",
    "build_scorer",
    "register_scorer",
]
